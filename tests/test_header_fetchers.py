"""The build's header fetchers (tools/fetch_onnxruntime_headers.sh, plugins/tensorrt/tools/
fetch_tensorrt_headers.py) go only through the machine's own package clients: apt's configured
sources and pip's configured index. Fast: apt-get and pip are stand-ins here, or pip is given no
index; the real downloads are exercised by the package build."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORT_SCRIPT = ROOT / "tools" / "fetch_onnxruntime_headers.sh"
TRT_SCRIPT = ROOT / "plugins" / "tensorrt" / "tools" / "fetch_tensorrt_headers.py"
BASH = shutil.which("bash")

needs_bash = pytest.mark.skipif(BASH is None or shutil.which("sha256sum") is None, reason="needs bash and coreutils")


def test_no_host_name_in_the_fetchers():
    for path in (ORT_SCRIPT, TRT_SCRIPT):
        code = "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
        assert not re.search(r"https?://|debian\.org|pypi\.org|pythonhosted", code), path


# ---- ONNX Runtime headers: apt ------------------------------------------------------------------

FAKE_APT = r"""#!/bin/bash
# apt-get stand-in: indextargets prints $FAKE_TARGETS / $FAKE_ORIGINS; update and download log
# their arguments and the private sources list to $FAKE_LOG
echo "ARGS $*" >> "$FAKE_LOG"
for a in "$@"; do
  case "$a" in
    Dir::Etc::sourcelist=*) echo "SOURCES $(cat "${a#Dir::Etc::sourcelist=}")" >> "$FAKE_LOG" ;;
  esac
done
case " $* " in
  *" indextargets "*)
    case " $* " in *" --no-release-info "*) printf '%b' "$FAKE_TARGETS" ;; *) printf '%b' "$FAKE_ORIGINS" ;; esac ;;
  *" update "*)
    grep -q "$(tail -n 1 "$FAKE_LOG" | sed 's/^SOURCES deb \[[^]]*\] \([^ ]*\) .*/\1/')" <<< "$FAKE_BROKEN" && exit 100
    exit 0 ;;
  *" download "*) echo "not a real package" > libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb ;;
esac
"""


def _fake_apt(tmp_path: Path, targets: str, origins: str = "", broken: str = "") -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text(FAKE_APT)
    apt.chmod(0o755)
    dpkg = bin_dir / "dpkg-deb"  # never reached: the stand-in .deb fails its sha256 first
    dpkg.write_text("#!/bin/sh\nexit 1\n")
    dpkg.chmod(0o755)
    log = tmp_path / "apt.args"
    log.touch()
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log),
            "FAKE_TARGETS": targets, "FAKE_ORIGINS": origins, "FAKE_BROKEN": broken or "-none-"}


def _run_ort(dest: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(ORT_SCRIPT), str(dest)], env=env, capture_output=True, text=True, timeout=60)


@needs_bash
def test_ort_no_debian_source_fails_in_one_line(tmp_path):
    # apt configured with no Debian archive: only a vendor repository of another origin and a security one
    env = _fake_apt(tmp_path, targets="deb http://vendor.test/apt/ stable\\ndeb http://archive.test/debian-security/ bookworm-security\\n",
                    origins="deb http://vendor.test/apt/ Vendor Vendor\\n")
    run = _run_ort(tmp_path / "out", env)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1, run.stderr
    assert "ONNXRUNTIME_INCLUDE_DIR" in run.stderr and "no Debian archive" in run.stderr
    assert " update" not in (tmp_path / "apt.args").read_text()  # nothing was fetched from anywhere


@needs_bash
def test_ort_no_apt_fails_in_one_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("mkdir"), bin_dir / "mkdir")
    run = subprocess.run([BASH, str(ORT_SCRIPT), str(tmp_path / "out")], env={"PATH": str(bin_dir)},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert "apt-get is not available" in run.stderr and "ONNXRUNTIME_INCLUDE_DIR" in run.stderr


@needs_bash
def test_ort_uses_apt_configured_mirrors_with_the_suite_swapped(tmp_path):
    targets = "".join(f"deb {uri} {suite}\\n" for uri, suite in [
        ("http://vendor.test/apt/", "nodistro"),            # origin unknown (no lists yet): tried after Debian's
        ("http://mirror.test/debian/", "bookworm"),
        ("http://mirror.test/debian/", "bookworm-updates"),  # the same repository: once
        ("http://mirror.test/debian-security/", "bookworm-security"),
        ("http://ubuntu.test/ubuntu/", "noble"),            # another origin: never
        ("http://flat.test/repo/", "./"),                   # a flat repository has no suites
    ])
    origins = ("deb http://mirror.test/debian/ Debian Debian\\ndeb http://ubuntu.test/ubuntu/ Ubuntu Ubuntu\\n"
               "deb http://mirror.test/debian-security/ Debian Debian-Security\\n")
    env = _fake_apt(tmp_path, targets, origins, broken="http://mirror.test/debian")
    dest = tmp_path / "out"
    run = _run_ort(dest, env)
    log = (tmp_path / "apt.args").read_text()
    sources = re.findall(r"^SOURCES (.*)$", log, re.M)
    assert list(dict.fromkeys(s.split("] ", 1)[1] for s in sources)) == ["http://mirror.test/debian trixie main", "http://vendor.test/apt trixie main"]
    assert all(re.match(r"deb \[(signed-by=/\S+|trusted=yes)\] ", s) for s in sources)
    updates = [ln for ln in log.splitlines() if ln.startswith("ARGS") and " update" in ln]
    assert len(updates) == 2
    for opt in (f"Dir::State::Lists={dest}/apt/lists", f"Dir::Cache={dest}/apt/cache", "Debug::NoLocking=1",
                f"Dir::Etc::sourceparts={dest}/apt/etc/sources.list.d"):
        assert f"-o {opt} " in updates[0], opt
    assert re.search(r"ARGS .* download libonnxruntime-dev:amd64=1\.21\.0\+dfsg-1$", log, re.M)
    # the stand-in's .deb is not the pinned one: refused, nothing extracted
    assert run.returncode == 1
    assert "expected 14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08" in run.stderr.splitlines()[-1]
    assert not (dest / "include").exists() and not (dest / "STAMP").exists()


@needs_bash
def test_ort_every_mirror_failing_names_them_in_one_line(tmp_path):
    env = _fake_apt(tmp_path, targets="deb http://mirror.test/debian/ bookworm\\n", broken="http://mirror.test/debian")
    run = _run_ort(tmp_path / "out", env)
    assert run.returncode == 1
    last = run.stderr.splitlines()[-1]
    assert "could not download" in last and "http://mirror.test/debian" in last and "ONNXRUNTIME_INCLUDE_DIR" in last


# ---- TensorRT headers: pip download -------------------------------------------------------------


@pytest.fixture(scope="module")
def trt():
    spec = importlib.util.spec_from_file_location("fetch_tensorrt_headers", TRT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trt_pip_arguments(trt, tmp_path):
    args = trt.pip_download_args(["pip"], tmp_path / "req.txt", tmp_path / "w")
    assert args[:2] == ["pip", "download"]
    for flag in ("--no-deps", "--only-binary=:all:", "--require-hashes", "--no-input"):
        assert flag in args
    assert not any(a.startswith(("--index-url", "-i", "--extra-index-url", "--trusted-host")) for a in args)
    assert args[args.index("--requirement") + 1] == str(tmp_path / "req.txt")
    assert trt.requirement_line() == f"kernel-lens==2.0.1 --hash=sha256:{trt.SHA256}\n"


def test_trt_pip_of_this_interpreter_first(trt, monkeypatch):
    cmd, env = trt.pip_command()
    assert cmd == [sys.executable, "-m", "pip"]
    # no pip importable (an isolated build environment): the one on PATH, without that environment's paths
    monkeypatch.setattr(trt.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(trt, "_imports_pip", lambda python, env: False)
    monkeypatch.setattr(trt.shutil, "which", lambda name: "/opt/x/bin/pip3" if name == "pip3" else None)
    monkeypatch.setenv("PYTHONPATH", "/overlay/site")
    monkeypatch.setenv("PIP_INDEX_URL", "http://index.test/simple")
    cmd, env = trt.pip_command()
    assert cmd == ["/opt/x/bin/pip3"] and "PYTHONPATH" not in env and env["PIP_INDEX_URL"] == "http://index.test/simple"
    monkeypatch.setattr(trt.shutil, "which", lambda name: None)
    assert trt.pip_command() is None
    assert trt.main(["x", "/nonexistent/never-written"]) == 1


def test_trt_no_pip_fails_in_one_line(trt, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("GLA_TENSORRT_HEADERS_WHEEL", raising=False)
    monkeypatch.setattr(trt, "pip_command", lambda: None)
    assert trt.main(["x", str(tmp_path / "h")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no pip" in err and "TENSORRT_INCLUDE_DIR" in err
    assert not (tmp_path / "h").exists()


def test_trt_nothing_configured_fails_in_one_line(tmp_path):
    # pip with no index and no find-links (and no config file): nowhere to download from
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "GLA_TENSORRT_HEADERS_WHEEL"}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    run = subprocess.run([sys.executable, str(TRT_SCRIPT), str(tmp_path / "h")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1, run.stderr
    assert "pip download kernel-lens==2.0.1 failed" in run.stderr and "TENSORRT_INCLUDE_DIR" in run.stderr
    assert not (tmp_path / "h").exists()


def _wheel(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_trt_wheel_checked_against_the_pin(trt, monkeypatch, tmp_path, capsys):
    fake = tmp_path / "kernel_lens-2.0.1-py3-none-any.whl"
    fake.write_bytes(_wheel({f"{trt.PREFIX}{h}": b"// header\n" for h in trt.REQUIRED}))
    monkeypatch.setenv("GLA_TENSORRT_HEADERS_WHEEL", str(fake))
    assert trt.main(["x", str(tmp_path / "h")]) == 1
    err = capsys.readouterr().err
    assert hashlib.sha256(fake.read_bytes()).hexdigest() in err and trt.SHA256 in err
    assert not (tmp_path / "h").exists()


def test_trt_extract_flattens_and_replaces(trt, tmp_path):
    dest = tmp_path / "h"
    dest.mkdir()
    (dest / "stale.h").write_text("old")
    data = _wheel({**{f"{trt.PREFIX}{h}": b"// header\n" for h in trt.REQUIRED},
                   f"{trt.PREFIX}sub/x.h": b"", f"{trt.PREFIX}.hidden.h": b"", "kernel_lens/other.h": b""})
    names = trt.extract(data, dest)
    assert names == sorted(trt.REQUIRED)
    assert sorted(p.name for p in dest.iterdir()) == sorted([*trt.REQUIRED, trt.STAMP])
    with pytest.raises(trt.FetchError, match="lacks NvInferVersion.h"):
        trt.extract(_wheel({f"{trt.PREFIX}{h}": b"" for h in trt.REQUIRED[:-1]}), tmp_path / "h2")
    assert not (tmp_path / "h2").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["h"]


def test_trt_pip_found_from_inside_an_isolated_build_environment(tmp_path):
    # as pip's build isolation does: a sitecustomize takes the installation's packages (pip too) off
    # sys.path and no pip is on PATH; the script still reaches this interpreter's pip
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "sitecustomize.py").write_text("import sys\nsys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "GLA_TENSORRT_HEADERS_WHEEL"}
    env.update(PYTHONPATH=str(overlay), PYTHONNOUSERSITE="1", PATH=str(tmp_path / "no-bin"),
               PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('pip') is None)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "True"  # pip is hidden as in the build environment
    run = subprocess.run([sys.executable, str(TRT_SCRIPT), str(tmp_path / "h")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1 and "pip download kernel-lens==2.0.1 failed" in run.stderr, run.stderr
