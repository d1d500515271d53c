"""benchmarks/revisions_ab.py on the CPU: the export of git revisions into trees, the worker's output parsed, the
table's medians and ratios, and every case a call that flash_attention accepts. Its run times kernels: GPU only."""
import inspect
import shutil
import subprocess
from pathlib import Path

import pytest

import cupyflash
from benchmark_scripts import revisions_ab

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_export_writes_each_revision_as_a_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    head = subprocess.run(["git", "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    done = revisions_ab.export(tmp_path, ["base=HEAD", "HEAD"])
    assert done == [("base", head), ("HEAD", head)]
    for name in ("base", "HEAD"):
        tree = tmp_path / name
        assert (tree / "cupyflash" / "__init__.py").is_file()
        assert (tree / "kernels_cu" / "flash_fwd_sm90.cuh").is_file()
        assert (tree / "REVISION").read_text().split() == ["HEAD", head]
    for name in ("base", "HEAD"):  # each tree's process imports its own cupyflash, not the installed one
        assert revisions_ab.imported_from(tmp_path, name) == (tmp_path / name / "cupyflash" / "__init__.py").resolve()
    assert revisions_ab.trees(tmp_path, None) == ["base", "HEAD"]
    assert revisions_ab.trees(tmp_path, "HEAD,base") == ["HEAD", "base"]
    with pytest.raises(subprocess.CalledProcessError):
        revisions_ab.export(tmp_path, ["x=no-such-revision"])


def test_parse_times_takes_only_time_lines():
    out = "DEVICE\tNVIDIA H200\t/x/cupyflash/__init__.py\nTIME\td64 N2048 plain / fwd\t0.5120\nnoise\tTIME\t1\n" \
          "TIME\td64 N2048 plain / bwd\t1.25\n"
    assert revisions_ab.parse_times(out) == {"d64 N2048 plain / fwd": 0.512, "d64 N2048 plain / bwd": 1.25}


def test_tests_for_takes_named_selections_for_their_tree_only():
    tests = ["tests/test_gpu_attention.py -n 8", "cmb=tests/test_gpu_features.py -k 'softcap or k=v'",
             "tests/test_gpu_features.py -k x=y"]
    assert revisions_ab.tests_for("main", tests) == [tests[0], tests[2]]
    assert revisions_ab.tests_for("cmb", tests) == [tests[0], "tests/test_gpu_features.py -k 'softcap or k=v'",
                                                    tests[2]]


def test_table_takes_medians_and_ratios_to_the_first_tree():
    runs = {"main": [{"a / fwd": 1.0, "b / fwd": 2.0}, {"a / fwd": 3.0, "b / fwd": 2.0}, {"a / fwd": 2.0}],
            "new": [{"a / fwd": 1.0}, {"a / fwd": 1.0}, {"a / fwd": 1.5}]}
    text = revisions_ab.table(["main", "new"], runs)
    assert "| a / fwd | 2.000 | 1.000 (0.500x) |" in text
    assert "| b / fwd | 2.000 | – |" in text


@pytest.mark.parametrize("case_set", sorted(revisions_ab.CASES))
def test_every_case_is_a_flash_attention_call(case_set):
    accepted = set(inspect.signature(cupyflash.flash_attention).parameters)
    labels = [label for label, *_ in revisions_ab.CASES[case_set]]
    assert len(labels) == len(set(labels)), "labels name the rows of the table"
    for label, dtype, d, n, kwargs, passes in revisions_ab.CASES[case_set]:
        assert set(kwargs) <= accepted, label
        assert dtype in ("bf16", "fp16") and 2048 % d == 0 and 16384 % n == 0, label
        assert set(passes.split(",")) <= {"fwd", "bwd"}, label
        for value in kwargs.values():
            assert not isinstance(value, str) or value in revisions_ab._MODS, label


def test_chosen_cases_match_labels():
    every = revisions_ab.chosen_cases("mods", "")
    assert every == revisions_ab.CASES["mods"]
    some = revisions_ab.chosen_cases("mods", "softcap,dense causal bool")
    assert some and all("softcap" in c[0] or "dense causal bool" in c[0] for c in some)
    assert len(some) < len(every)


class _Warm:
    """A finished compile process."""
    returncode = 0

    def communicate(self):
        return "warm: 0 modules", ""


def _canned_trees(tmp_path, monkeypatch, ms) -> list:
    """Trees main and new under tmp_path whose workers answer at once: the import check with the tree's own
    cupyflash, the compiles done, and each round's worker a DEVICE line and one case at `ms(name, args)` ms. Returns
    the list the workers' calls are appended to."""
    for name in ("main", "new"):
        (tmp_path / name / "cupyflash").mkdir(parents=True)
        (tmp_path / name / "REVISION").write_text(f"{name} {'0' * 40}\n")
    calls = []

    def in_tree(directory, name, *args):
        calls.append((name, *args))
        if args[0] == "_where":
            out = str((directory / name / "cupyflash" / "__init__.py").resolve())
        else:
            out = f"DEVICE\tGPU X\t{name}\nTIME\td64 N2048 plain / fwd\t{ms(name, args)}\n"
        return subprocess.CompletedProcess(args, 0, out, "")

    monkeypatch.setattr(revisions_ab, "_in_tree", in_tree)
    monkeypatch.setattr(revisions_ab, "_worker", lambda directory, name, *args, script: _Warm())
    return calls


def test_run_tables_every_tree_and_fa4_from_the_workers(tmp_path, monkeypatch):
    """run() with the workers replaced by canned output: the trees' import check, the compiles, the rounds in turns
    (FA4's from the first tree's process), the tests by tree, and the written table."""
    calls = _canned_trees(tmp_path, monkeypatch,
                          lambda name, args: {"main": 2.0, "new": 1.0}[name] if args[-1] != "fa4" else 4.0)
    ran_tests = []
    real_run = subprocess.run
    monkeypatch.setattr(revisions_ab.subprocess, "run", lambda cmd, cwd, **kw: (
        ran_tests.append((Path(cwd).name, cmd[-1])), subprocess.CompletedProcess(cmd, 0, "1 passed", ""))[1])
    out = tmp_path / "ab.md"
    assert revisions_ab.run(tmp_path, ["main", "new"], "plain", 2, [], ["new=tests/test_x.py"], out, 1e9,
                            fa4=True, match="plain") == 0
    monkeypatch.setattr(revisions_ab.subprocess, "run", real_run)
    text = out.read_text()
    assert "GPU X" in text and "| d64 N2048 plain / fwd | 2.000 | 1.000 (0.500x) | 4.000 (2.000x) |" in text
    rounds = [c for c in calls if c[1] == "_cases"]
    assert [c[0] for c in rounds] == ["main", "new", "main", "main", "new", "main"]  # fa4 from main's process
    assert ran_tests == [("new", "tests/test_x.py")]


def test_run_goes_on_past_a_selection_that_outlasts_its_time(tmp_path, monkeypatch, capsys):
    """A pytest selection stopped at --tests-s: its output so far is printed, and the rounds and table go on."""
    _canned_trees(tmp_path, monkeypatch, lambda name, args: len(name))

    def slow_tests(cmd, cwd, timeout, **kw):
        raise subprocess.TimeoutExpired(cmd, timeout, output=b"....F still running")

    monkeypatch.setattr(revisions_ab.subprocess, "run", slow_tests)
    out = tmp_path / "ab.md"
    assert revisions_ab.run(tmp_path, ["main", "new"], "plain", 2, [], ["new=tests/test_x.py"], out, 1e9,
                            tests_s=5) == 0
    printed = capsys.readouterr().out
    assert "tests new [tests/test_x.py]: stopped after 5 s" in printed and "....F still running" in printed
    assert "(2 of 2 rounds)" in out.read_text()
