"""MLflow entry point `train`: parse the parameters, run `nws train`, exit with its code."""

from nws.cli import run_entry_point

if __name__ == "__main__":
    run_entry_point("train")
