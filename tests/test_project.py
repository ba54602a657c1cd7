"""The project files agree with the code: MLproject parameters follow the options dataclasses,
and CI runs the README's test command."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import yaml

from nws.cli import _commands
from tests.conftest import ROOT

MLPROJECT = yaml.safe_load((ROOT / "MLproject").read_text())


def mlflow_default(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_mlproject_parameters_follow_the_options_dataclass(name):
    command = _commands()[name]
    entry = MLPROJECT["entry_points"][name]
    fields = {f.name: f for f in dataclasses.fields(command.options)}
    assert list(entry["parameters"]) == list(fields)
    for key, spec in entry["parameters"].items():
        assert mlflow_default(spec["default"]) == mlflow_default(fields[key].default), key
        kind = {"int": "int", "float": "float"}.get(str(fields[key].type), "string")
        assert spec["type"] == kind, key
        assert f"--{key.replace('_', '-')} {{{key}}}" in entry["command"]
    assert entry["command"].startswith(f"python -m entrypoints.{name} ")
    assert (ROOT / "entrypoints" / f"{name}.py").is_file()


def test_mlproject_is_the_rendered_declaration():
    from nws.cli import mlproject_text

    assert (ROOT / "MLproject").read_text() == mlproject_text()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    main_job, tests = blocks[0], blocks[1]
    assert main_job.endswith("mlflow run . --env-manager local --experiment-name nws")
    assert tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[dev]"' in ci
    assert ci.rstrip().endswith("python -m pytest")


def test_cluster_job_files_run_sample_with_its_parameters():
    import dataclasses

    import yaml

    from nws.commands.sample import SampleOptions

    names = {f.name for f in dataclasses.fields(SampleOptions)}
    slurm = (ROOT / "examples" / "cluster" / "sample.sbatch").read_text()
    assert "mlflow run . -e sample" in slurm
    slurm_params = re.findall(r"-P (\w+)=", slurm)
    assert {"campaign", "target", "storage"} <= set(slurm_params) <= names
    job = yaml.safe_load((ROOT / "examples" / "cluster" / "sample-job.yaml").read_text())
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["nws", "sample"]
    k8s_params = {a.split("=")[0].removeprefix("--").replace("-", "_") for a in container["args"]}
    assert {"campaign", "target", "storage"} <= k8s_params <= names
    assert {e["name"] for e in container["env"]} >= {"MLFLOW_TRACKING_URI"}


def test_docs_reference_is_the_rendered_declaration():
    from nws.cli import reference_text

    assert (ROOT / "docs" / "reference.md").read_text() == reference_text()


def test_reference_lists_every_parameter_with_what_it_accepts():
    from nws.cli import reference_text

    text = reference_text()
    for name, command in _commands().items():
        section = text.split(f"## `{name}`\n", 1)[1].split("\n## ", 1)[0]
        rows = [line for line in section.splitlines() if line.startswith("| `")]
        assert [row.split("`")[1] for row in rows] == [f.name for f in dataclasses.fields(command.options)]
    assert "| `seed` | `0` | integer 0..4294967295 |" in text
    assert "| `test_fraction` | `0.2` | number in (0, 1) |" in text


def _headings_slugs(path):
    from markdown.extensions.toc import slugify

    slugs = set()
    for line in path.read_text().splitlines():
        heading = re.match(r"#+ (.*?)(?: \{#([\w-]+)\})?$", line)
        if heading:
            slugs.add(heading.group(2) or slugify(heading.group(1).replace("`", ""), "-"))
    return slugs


def test_readme_is_a_short_front_door_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert len(links) >= 10
    for target, anchor in links:
        if "://" in target:
            continue
        path = ROOT / target
        assert path.is_file(), target
        if anchor:
            assert anchor in _headings_slugs(path), f"{target}#{anchor}"


@pytest.mark.slow
def test_docs_site_builds_strict_offline(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    pages = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    assert {"index.html", "tutorial/index.html", "reference/index.html", "extending/index.html"} <= pages
    assert (tmp_path / "site" / "search" / "search_index.json").is_file()
