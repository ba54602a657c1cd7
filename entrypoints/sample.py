"""MLflow entry point `sample`: parse the parameters, run `nws sample`, exit with its code."""

from nws.cli import run_entry_point

if __name__ == "__main__":
    run_entry_point("sample")
