"""MLflow entry point `export_nws`: parse the parameters, run `nws export_nws`, exit with its code."""

from nws.cli import run_entry_point

if __name__ == "__main__":
    run_entry_point("export_nws")
