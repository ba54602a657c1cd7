"""Stop `nws sample` mid-net again and again, and count what went wrong.

Each try starts `nws sample` (two small nets of 8 epochs, its own campaign), waits until the
first net has started, sends SIGINT or SIGTERM (alternately) after a random delay that spreads
the signals over the net's evaluations, Keras' fit and the run's bookkeeping, and then checks:
the process exits 130 (not a native abort such as `free(): invalid next size`, exit 134), and
every MLflow run and Optuna trial of its campaign has ended (the nets and the campaign run KILLED
or FINISHED, no trial RUNNING).

Run: python benchmarks/interrupt_stress.py [--tries 20] [--max-delay 6] [--seed 0]
Exit code 0 only when every try passed.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.interruptions import SIGNALS, interrupt_mid_net, start_sample, unended  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--max-delay", type=float, default=6.0, help="most seconds after the net starts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signals", default="INT,TERM", help="comma list, used in turn: INT, TERM")
    parser.add_argument("--sample-args", default="", help="more `nws sample` arguments (they override)")
    parser.add_argument("--logs", default="", help="directory to keep each try's output in")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    signals = [s.strip() for s in args.signals.split(",")]
    failures = noisy = 0
    with tempfile.TemporaryDirectory(prefix="nws-stress-") as tmp:
        root = Path(tmp)
        uri, storage = f"sqlite:///{root / 'mlflow.db'}", str(root / "optuna.log")
        for n in range(args.tries):
            name, delay = signals[n % len(signals)], rng.uniform(0.0, args.max_delay)
            campaign = f"stress{n}"
            started = time.monotonic()
            sample = start_sample(campaign, uri, storage, root, *args.sample_args.split())
            sent = interrupt_mid_net(sample, SIGNALS[name], delay)
            code, output = sample.finish(120)
            left = unended(uri, storage, campaign)
            if args.logs:
                Path(args.logs).mkdir(parents=True, exist_ok=True)
                (Path(args.logs) / f"try{n + 1:02d}.txt").write_text(output)
            noisy += "Exception ignored in" in output
            ok = sent and code == 130 and not left
            failures += not ok
            print(f"try {n + 1:2d}: SIG{name} {delay:4.1f} s into the net: exit {code}, "
                  f"{len(left)} left running, {time.monotonic() - started:4.1f} s"
                  f"{'' if ok else '  FAILED'}", flush=True)  # fmt: skip
            if not ok:
                if not sent:
                    print("  the signal was not sent: the process ended or never started a net")
                for entry in left:
                    print(f"  {entry}")
                print("  " + "".join(output.splitlines(keepends=True)[-8:]).replace("\n", "\n  "))
    print(f"{args.tries - failures}/{args.tries} tries stopped cleanly; {noisy} printed an exception "
          "ignored inside a library")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
