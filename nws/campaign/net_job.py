"""One net of a campaign: its images, its training with snapshot capture, and its MLflow run,
which ends FINISHED only once every artifact is stored (or FAILED, KILLED, with the reason)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nws import space
from nws.campaign.settings import CampaignSettings
from nws.campaign.trials import TAKEN_OVER
from nws.space import NetConfig
from nws.tracking import artifacts, runs
from nws.tracking.tags import TAG_FAILURE, TAG_STOP_REASON, net_tags


@dataclass
class NetOutcome:
    run_id: str
    finished: bool
    test_accuracy: float = float("nan")
    epochs: int = 0
    failure: str = ""

    def line(self, index: int, total: int) -> str:
        if self.finished:
            return (
                f"net {index}/{total} finished: test accuracy {self.test_accuracy:.4f} after "
                f"{self.epochs} epochs (run {self.run_id})"
            )
        return f"net {index}/{total} failed: {self.failure} (run {self.run_id})"


@dataclass
class NetJob:
    """One net of a campaign: data, training, snapshot capture and its MLflow run."""

    campaign: CampaignSettings
    trial_number: int
    config: NetConfig
    environment: dict[str, str]

    @property
    def seed(self) -> int:
        return space.trial_seed(self.campaign.seed, self.trial_number)

    @property
    def label(self) -> str:
        c = self.config
        return f"trial {self.trial_number} {c.dataset} {c.optimizer} {c.activation}"

    def tags(self) -> dict[str, str]:
        c = self.campaign
        return {**net_tags(c.subset, c.name, self.trial_number, self.seed), **self.environment}

    def params(self, sizes: dict[str, int]) -> dict[str, Any]:
        c = self.campaign
        return {
            **self.config.as_params(),
            "seed": self.seed,
            "prints": c.prints,
            "max_train_images": c.max_train_images,
            "max_eval_images": c.max_eval_images,
            "deterministic": c.deterministic,
            "backend": c.backend,
            **c.train.as_params(),
            **sizes,
        }

    def start(self) -> tuple[Any, Any, str]:
        """The net's images, its weight layout and its MLflow run, started in this thread."""
        from nws.data import dataset_identity, load_images, split_for_net
        from nws.net.snapshots import weight_layout
        from nws.tracking.datasets import image_dataset, net_input_tags

        c = self.campaign
        images = load_images(self.config.dataset, c.data_dir, c.download)
        data = split_for_net(
            images, self.seed, c.max_train_images, c.max_eval_images, fidelity=c.train.fidelity
        )
        layout = weight_layout(self.config)
        digest, origin = dataset_identity(self.config.dataset, c.data_dir, c.download)
        run_id = runs.start_net_run(
            f"net-{c.name}-{self.trial_number:05d}",
            self.tags(),
            self.params(data.sizes()),
            parent_run_id=c.parent_run_id or None,
            dataset=(
                image_dataset(self.config.dataset, digest, origin),
                net_input_tags(self.seed, data.sizes()),
            ),
        )
        return data, layout, run_id

    def run(
        self,
        observers: list[Any],
        on_start: Callable[[str], None] | None = None,
        still_ours: Callable[[], bool] | None = None,
    ) -> NetOutcome:
        """Train the net in its own MLflow run. `still_ours` is asked before the result is
        written: False (the trial was given to another worker) ends the run FAILED instead."""
        from nws.net.snapshots import SnapshotRecorder
        from nws.net.training import TrainingDiverged, train_net

        data, layout, run_id = self.start()
        try:  # straight after: nothing between that a stop signal could cut
            if on_start is not None:
                on_start(run_id)
            with SnapshotRecorder(layout) as recorder:

                def capture(model: Any, epoch: int, metrics: dict[str, float]) -> None:
                    recorder.record(model, epoch, metrics)
                    runs.log_epoch(epoch, metrics)

                try:
                    result = train_net(
                        self.config, data, self.seed, self.campaign.train, [capture, *observers]
                    )
                except TrainingDiverged as diverged:
                    return self.diverged(run_id, diverged)
                return self.finish(run_id, layout, recorder, result, still_ours)
        except BaseException as error:
            runs.abort_run(run_id, error)
            raise

    def diverged(self, run_id: str, diverged: Any) -> NetOutcome:
        """End the net's run FAILED: its loss became NaN (`TrainingDiverged`)."""
        runs.end_run("FAILED", {TAG_FAILURE: f"nan_loss: {diverged}"})
        return NetOutcome(run_id, False, epochs=diverged.epoch, failure=str(diverged))

    def finish(
        self, run_id: str, layout: Any, recorder: Any, result: Any, still_ours: Callable[[], bool] | None
    ) -> NetOutcome:
        """Store a trained net's artifacts, then end its run FINISHED (FAILED when its trial was
        taken over meanwhile). The caller aborts the run on an error."""
        from nws.net.snapshots import layout_document

        weights, snapshots = recorder.select(self.campaign.prints)
        if still_ours is not None and not still_ours():
            runs.end_run("FAILED", {TAG_FAILURE: TAKEN_OVER})
            return NetOutcome(run_id, False, epochs=result.epochs, failure=TAKEN_OVER)
        final = result.history[-1]
        artifacts.log_net_result(
            weights,
            layout_document(self.config, layout, snapshots),
            result.history,
            {
                "epochs": result.epochs,
                "train_seconds": result.seconds,
                "weightn_conv": layout.weightn_conv,
                "weightn_fc": layout.weightn_fc,
                "steps_per_epoch": result.steps_per_epoch,
            },
            {TAG_STOP_REASON: result.stop_reason},
        )
        runs.end_run("FINISHED")
        return NetOutcome(run_id, True, final["test_accuracy"], result.epochs)
