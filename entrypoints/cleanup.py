"""MLflow entry point `cleanup`: parse the parameters, run `nws cleanup`, exit with its code."""

from nws.cli import run_entry_point

if __name__ == "__main__":
    run_entry_point("cleanup")
