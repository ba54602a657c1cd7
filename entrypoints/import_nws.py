"""MLflow entry point `import_nws`: parse the parameters, run `nws import_nws`, exit with its code."""

from nws.cli import run_entry_point

if __name__ == "__main__":
    run_entry_point("import_nws")
