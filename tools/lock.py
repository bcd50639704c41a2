"""Lock files: the exact package versions the test suite passed with, per platform.

    python tools/lock.py write --python .venv-lock/bin/python   after the suite passed in that venv
    python tools/lock.py diff --python .venv-newest/bin/python   what a venv has that the lock does not
    python tools/lock.py blame --python .venv-newest/bin/python -- <pytest args>
                                                                 which newer package breaks those tests
    python tools/lock.py floor --python .venv/bin/python --target .floor-site
                                                                 the oldest transformers allowed (and what it
                                                                 needs) into a folder to put before the venv

Two files per platform (`py3.11-linux-x86_64`, say) in locks/:
  <platform>.txt       every package but the accelerator stack, as pip constraints (pip install -c)
  <platform>-cpu.txt   the accelerator stack CI ran on a machine without a GPU (torch's CPU build, triton)
The accelerator stack is kept apart because a CUDA machine takes torch, and the triton that torch
pins, from its own index (make install TORCH=...).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK_DIR = ROOT / "locks"
ACCELERATOR_STACK = re.compile(r"^(torch|triton|pytorch-triton|nvidia-.*|cuda-.*)$")
# The dependencies whose releases broke, or may break, the project: tried first when blaming.
FAST_MOVING = ["transformers", "deepspeed", "datasets", "hydra-core", "omegaconf", "triton", "wandb", "accelerate",
               "gguf", "tokenizers", "huggingface-hub", "safetensors"]
PROJECT = "moba-train"
# Installed at their declared floor by `make test-floor`: the GPU image's versions, older than the lock's.
FLOOR_PACKAGES = ["transformers"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def platform_name(python: str = sys.executable) -> str:
    code = ("import platform, sys; print(f'py{sys.version_info[0]}.{sys.version_info[1]}-"
            "{sys.platform}-{platform.machine()}')")
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def installed(python: str) -> dict[str, str]:
    """{normalized name: version} of a venv, the project itself left out."""
    out = subprocess.run([python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                         check=True, capture_output=True, text=True).stdout
    skip = {PROJECT, "pip", "setuptools", "wheel"}
    return {norm(p["name"]): p["version"] for p in json.loads(out) if norm(p["name"]) not in skip}


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[norm(name)] = version
    return pins


def lock_paths(plat: str) -> tuple[Path, Path]:
    return LOCK_DIR / f"{plat}.txt", LOCK_DIR / f"{plat}-cpu.txt"


def locked(plat: str) -> dict[str, str]:
    main, accel = lock_paths(plat)
    if not main.is_file():
        sys.exit(f"no lock for {plat} in {LOCK_DIR}: run `make lock` on this platform (or install the newest allowed "
                 f"versions with `make install LOCK=none`)")
    return {**read_lock(main), **(read_lock(accel) if accel.is_file() else {})}


def cmd_write(args) -> None:
    plat = platform_name(args.python)
    have = installed(args.python)
    stamp = (f"# Written by `make lock` on {datetime.date.today()} after the full test suite passed with exactly these "
             f"versions\n# (python {plat}, {platform.platform()}). Do not edit by hand: run `make lock` again.\n")
    main, accel = lock_paths(plat)
    LOCK_DIR.mkdir(exist_ok=True)
    portable = {n: v for n, v in have.items() if not ACCELERATOR_STACK.match(n)}
    stack = {n: v for n, v in have.items() if ACCELERATOR_STACK.match(n)}
    main.write_text(stamp + "".join(f"{n}=={v}\n" for n, v in sorted(portable.items())))
    accel.write_text(stamp + "# The accelerator stack on a machine without a GPU (make install's default TORCH).\n"
                     + "".join(f"{n}=={v}\n" for n, v in sorted(stack.items())))
    print(f"wrote {main.relative_to(ROOT)} ({len(portable)} packages) and {accel.relative_to(ROOT)} ({len(stack)})")


def differences(python: str) -> list[tuple[str, str | None, str]]:
    """(package, locked version or None, installed version) for every package that differs from the lock."""
    have, pins = installed(python), locked(platform_name(python))
    return [(n, pins.get(n), v) for n, v in sorted(have.items()) if pins.get(n) != v]


def cmd_diff(args) -> None:
    rows = differences(args.python)
    if not rows:
        print("the venv has exactly the locked versions")
        return
    print(f"{len(rows)} package(s) differ from the lock ({platform_name(args.python)}):")
    for name, old, new in rows:
        print(f"  {name:28s} {old or '(not locked)':>14s} -> {new}")


def _pytest(python: str, pytest_args: list[str]) -> bool:
    return subprocess.run([python, "-m", "pytest", *pytest_args], cwd=ROOT).returncode == 0


def _pip_install(python: str, spec: str) -> None:
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check", spec],
                   check=True, cwd=ROOT)


def cmd_blame(args) -> None:
    """Put each newer package back to its locked version alone; the one that makes the failing tests pass broke them."""
    rows = [r for r in differences(args.python) if r[1] is not None]
    rows.sort(key=lambda r: (FAST_MOVING.index(r[0]) if r[0] in FAST_MOVING else len(FAST_MOVING), r[0]))
    rerun = ["--lf", "-q", "-x", *args.pytest_args]
    culprits = []
    for name, old, new in rows:
        print(f"\n== blame: {name} {new} -> back to the locked {old}", flush=True)
        _pip_install(args.python, f"{name}=={old}")
        try:
            passed = _pytest(args.python, rerun)
        finally:
            _pip_install(args.python, f"{name}=={new}")
        if passed:
            culprits.append((name, old, new))
            if not args.all:
                break
    print()
    if culprits:
        for name, old, new in culprits:
            print(f"BROKEN BY {name}=={new}: the failing tests pass with the locked {name}=={old} and every other "
                  f"package at its newest. Fix moba-train for {name} {new}, or cap it below {new} in pyproject.toml.")
    else:
        print("no single package explains the failure: with each newer package put back alone the tests still fail; "
              "the newer versions differ in: " + ", ".join(f"{n} {o}->{v}" for n, o, v in rows))
    sys.exit(1)


def declared_floor(name: str) -> str:
    """The `>=` bound pyproject.toml declares for a dependency."""
    from packaging.requirements import Requirement   # in every venv of the project (transformers needs it)

    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        floors = [spec.version for spec in req.specifier if spec.operator == ">="]
        if norm(req.name) == norm(name) and floors:
            return floors[0]
    raise SystemExit(f"pyproject.toml declares no '>=' floor for {name}")


def cmd_floor(args) -> None:
    """Install FLOOR_PACKAGES at their declared floors, with whatever else of the venv they need changed, into
    a folder (pip --target) that goes before the venv on PYTHONPATH: the venv itself stays as locked."""
    specs = [f"{name}=={declared_floor(name)}" for name in FLOOR_PACKAGES]
    report = subprocess.run([args.python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-",
                             "--disable-pip-version-check", *specs], check=True, capture_output=True, text=True)
    needed = [f"{item['metadata']['name']}=={item['metadata']['version']}"
              for item in json.loads(report.stdout)["install"]]
    subprocess.run([args.python, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                    "--target", args.target, *needed], check=True)
    print(f"in {args.target} (before the venv on PYTHONPATH): {' '.join(needed)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("write", cmd_write), ("diff", cmd_diff), ("blame", cmd_blame), ("floor", cmd_floor),
                     ("platform", None)):
        p = sub.add_parser(name)
        p.add_argument("--python", default=sys.executable, help="the venv's python")
        if name == "blame":
            p.add_argument("--all", action="store_true", help="try every package, not only up to the first culprit")
            p.add_argument("pytest_args", nargs="*", help="the tests that failed (after --)")
        if name == "floor":
            p.add_argument("--target", required=True, help="the folder to install into")
        p.set_defaults(fn=fn)
    args = parser.parse_args()
    if args.command == "platform":
        print(platform_name(args.python))
    else:
        args.fn(args)


if __name__ == "__main__":
    main()
