"""Summarise one module's mutmut results (run by scripts/mutation_test.sh inside .mutation/<module>/).

usage: python mutation_report.py VENV TESTS PATTERN...   (TESTS: space-separated test files and test IDs)

Prints the counts and every mutant that was not killed. Survivors in functions that only run at import time
(the registry decorators: mutmut switches mutants on at call time, after the imports) are re-checked here:
the mutant is applied to this copy of the source and the module's tests run in a fresh interpreter.
"""

import fnmatch
import json
import pathlib
import subprocess
import sys

STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
}
IMPORT_TIME = ("x_register_estimator", "x_register_loss", "x_register_component")

venv, test_files, patterns = pathlib.Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3:]
results = {}
for meta in pathlib.Path("mutants").rglob("*.py.meta"):
    source = str(meta.relative_to("mutants"))[: -len(".meta")]
    for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
        if any(fnmatch.fnmatch(name, p) for p in patterns):
            results[name] = (source, "not checked" if code is None else STATUS.get(code, f"exit {code}"))

for name, (source, status) in sorted(results.items()):
    if status == "survived" and name.split("__mutmut_")[0].rsplit(".", 1)[-1] in IMPORT_TIME:
        original = pathlib.Path(source).read_text()
        try:
            subprocess.run([str(venv / "bin" / "mutmut"), "apply", name], check=True, capture_output=True)
            run = subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *test_files],
                capture_output=True,
                text=True,
            )
        finally:
            pathlib.Path(source).write_text(original)
        results[name] = (source, "killed at import" if run.returncode != 0 else "survived")

counts = {}
for _, status in results.values():
    counts[status] = counts.get(status, 0) + 1
print(f"  {len(results)} mutants: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
for name, (_, status) in sorted(results.items()):
    if status not in ("killed", "killed at import", "timeout"):
        print(f"    {status}: {name}")
pathlib.Path("summary.json").write_text(json.dumps({n: s for n, (_, s) in sorted(results.items())}, indent=1))
