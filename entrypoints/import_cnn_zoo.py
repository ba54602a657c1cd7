"""MLflow entry point `import_cnn_zoo`: parse the parameters, run `nws import_cnn_zoo`, exit with its code."""

from nws.cli import run_entry_point

if __name__ == "__main__":
    run_entry_point("import_cnn_zoo")
