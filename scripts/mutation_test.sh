#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the learning-critical code with the fast unit tests (no Ray). Not part of
# CI: it takes hours on 2 cores (docs/testing.md has the per-module times, scores and every survivor).
#
#   scripts/mutation_test.sh                  # every module below, one after the other
#   scripts/mutation_test.sh advantages loss  # only these
#   MUTMUT_CHILDREN=1 scripts/mutation_test.sh learner
#
# Module             what is mutated                                                  tests that may kill a mutant
#   advantages         pipeline/algorithm/advantages.py (whole)                       test_advantages, test_loss, test_rewards
#   loss               pipeline/algorithm/loss.py (whole)                             test_loss
#   algorithm_rewards  pipeline/algorithm/rewards.py (whole)                          test_algorithm_rewards, test_rewards, test_actors
#   rewards            pipeline/rewards/base.py: score_component                      test_rewards
#   reward_components  pipeline/rewards/components.py (whole)                         test_rewards, test_models, test_token_metrics
#   learner            actors/learner.py: lr_factor, Learner.train_step,              test_actors, test_models, test_rewards
#                      _gradients, _count_nonfinite, _micro_batches,
#                      _reference_logprobs
#   rollout_worker     actors/rollout_worker.py: sample_tokens,                       test_actors, test_models
#                      RolloutWorker._sample (the generation loop)
# (each module's tests plus every test marked @pytest.mark.mutant, in whichever file: the tests written to kill
# earlier survivors, which live in the test file of the module they pin). mutmut runs, for each mutant, only those
# of the selected tests that called the mutated function.
#
# mutmut 3 mutates the bodies of functions and methods only: not module-level code (here: the AGGREGATIONS
# lambdas of pipeline/algorithm/loss.py), and not functions under a decorator other than @staticmethod/@classmethod.
# So that the registered estimators and losses and the @torch.no_grad() methods are mutated too,
# scripts/mutation_undecorate.py moves those decorators to the end of the module in the copy (same behaviour).
#
# Each module runs in its own copy of the code, .mutation/<module>/ (git-ignored), with the [tool.mutmut]
# section written below; mutmut keeps its results in .mutation/<module>/mutants/, so a second run only
# tests mutants without a result: the script names exactly those to mutmut, which (3.8.1) would otherwise run
# every mutant matching the names again; when the module's source changed, it passes the module's patterns, so
# that mutmut regenerates and runs them all (delete the folder to start over). For a mutant's diff:
#   cd .mutation/learner && ../../.venv/bin/mutmut show 'actors.learner.x_lr_factor__mutmut_3'
# Each module prints its wall time, its counts and its survivors.
# After adding tests, RETEST=1 scripts/mutation_test.sh <module> clears the results of that module's
# survivors (result "survived"), so that only they run again; RETEST='<glob> ...' only those survivors whose
# names match, e.g. RETEST='*policy_loss__mutmut_36 *policy_loss__mutmut_82' scripts/mutation_test.sh loss
# (a survivor runs every test that calls its function: re-running the equivalent ones costs the most).
#
# mutmut switches mutants on inside functions that run at test time; code that runs at import time (the
# registry decorators register_estimator, register_loss, register_component) only ever runs unmutated
# there. Survivors in those functions are re-checked by applying the mutant to a copy of the source and
# running the module's tests in a fresh interpreter (reported as "killed at import" or "survived").
#
# On a shared machine, run each module under your CPU lock, e.g.
#   for m in advantages loss; do flock -o /tmp/cpu.lock scripts/mutation_test.sh $m; done
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$repo/.venv}
children=${MUTMUT_CHILDREN:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per mutant worker, MUTMUT_CHILDREN workers at a time

declare -A files=(
    [advantages]=pipeline/algorithm/advantages.py
    [loss]=pipeline/algorithm/loss.py
    [algorithm_rewards]=pipeline/algorithm/rewards.py
    [rewards]=pipeline/rewards/base.py
    [reward_components]=pipeline/rewards/components.py
    [learner]=actors/learner.py
    [rollout_worker]=actors/rollout_worker.py
)
declare -A globs=(
    [advantages]="pipeline.algorithm.advantages.*"
    [loss]="pipeline.algorithm.loss.*"
    [algorithm_rewards]="pipeline.algorithm.rewards.*"
    [rewards]="pipeline.rewards.base.x_score_component__mutmut_*"
    [reward_components]="pipeline.rewards.components.*"
    [learner]="actors.learner.x_lr_factor__mutmut_* actors.learner.xǁLearnerǁtrain_step__mutmut_* actors.learner.xǁLearnerǁ_gradients__mutmut_* actors.learner.xǁLearnerǁ_count_nonfinite__mutmut_* actors.learner.xǁLearnerǁ_micro_batches__mutmut_* actors.learner.xǁLearnerǁ_reference_logprobs__mutmut_*"
    [rollout_worker]="actors.rollout_worker.x_sample_tokens__mutmut_* actors.rollout_worker.xǁRolloutWorkerǁ_sample__mutmut_*"
)
declare -A tests=(
    [advantages]="test_advantages test_loss test_rewards"
    [loss]="test_loss"
    [algorithm_rewards]="test_algorithm_rewards test_rewards test_actors"
    [rewards]="test_rewards"
    [reward_components]="test_rewards test_models test_token_metrics"
    [learner]="test_actors test_models test_rewards"
    [rollout_worker]="test_actors test_models"
)
order=(advantages loss algorithm_rewards rewards reward_components learner rollout_worker)
# the tests marked @pytest.mark.mutant (pyproject's markers), as test IDs without their parameters
mapfile -t mutant_tests < <(cd "$repo" && "$venv/bin/python" -m pytest --collect-only -q -p no:cacheprovider -m mutant tests \
    | sed -n '/::/{s/\[.*//;p}' | sort -u)
((${#mutant_tests[@]})) || { echo "no test is marked mutant (pytest -m mutant collected none)" >&2; exit 1; }
modules=("$@")
((${#modules[@]})) || modules=("${order[@]}")
for module in "${modules[@]}"; do
    [[ -n ${files[$module]:-} ]] || { echo "unknown module '$module'; known: ${order[*]}" >&2; exit 2; }
done

for module in "${modules[@]}"; do
    work=$repo/.mutation/$module
    mkdir -p "$work"
    # the code and tests as they are now (mutmut regenerates the mutants of a changed file)
    before=$(sha256sum <"$work/${files[$module]}" 2>/dev/null || true)  # the module as the last run mutated it
    rm -rf "$work/tests"
    cp -r "$repo/pipeline" "$repo/actors" "$repo/tests" "$work/"
    "$venv/bin/python" "$repo/scripts/mutation_undecorate.py" "$work/${files[$module]}"
    changed=$([[ $(sha256sum <"$work/${files[$module]}") == "$before" ]] && echo no || echo yes)
    # the module's test files, then the mutant-marked tests of other files
    selected=()
    for t in ${tests[$module]}; do selected+=("tests/$t.py"); done
    for id in "${mutant_tests[@]}"; do
        [[ " ${selected[*]} " == *" ${id%%::*} "* ]] || selected+=("$id")
    done
    selection=$(printf '"%s", ' "${selected[@]}")
    sed '/^\[tool\.mutmut\]/,$d' "$repo/pyproject.toml" >"$work/pyproject.toml"
    cat >>"$work/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["pipeline/", "actors/"]
only_mutate = ["${files[$module]}"]
pytest_add_cli_args_test_selection = [${selection%, }]
pytest_add_cli_args = ["-p", "no:cacheprovider"]
# torch is not fork-safe once its thread pools have run (children forked from the process that ran the
# tests hang): fork every mutant's worker from a server that only imported and collected the tests
process_isolation = "forkserver"
EOF
    read -r -a patterns <<<"${globs[$module]}"
    if [[ -n ${RETEST:-} && $RETEST != 0 && -d $work/mutants ]]; then  # survivors only: back to "not checked"
        (cd "$work" && "$venv/bin/python" - "$RETEST" "${patterns[@]}" <<'PY'
import fnmatch, json, pathlib, sys
only = None if sys.argv[1] == "1" else sys.argv[1].split()
for meta in pathlib.Path("mutants").rglob("*.py.meta"):
    data = json.loads(meta.read_text())
    codes = data["exit_code_by_key"]
    again = [
        k for k, c in codes.items()
        if c == 0 and any(fnmatch.fnmatch(k, p) for p in sys.argv[2:]) and (only is None or any(fnmatch.fnmatch(k, p) for p in only))
    ]
    codes.update(dict.fromkeys(again, None))
    meta.write_text(json.dumps(data))
    print(f"{meta}: {len(again)} survivors to run again")
PY
        )
    fi
    # mutmut 3.8.1 runs again every mutant that matches the names it is given, whatever its stored result: once
    # the mutants exist (and the module is unchanged), name only those without a result (the RETEST ones included)
    names=("${patterns[@]}")
    if [[ -d $work/mutants && $changed == no ]]; then
        mapfile -t names < <(cd "$work" && "$venv/bin/python" - "${patterns[@]}" <<'PY'
import fnmatch, json, pathlib, sys
for meta in pathlib.Path("mutants").rglob("*.py.meta"):
    for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
        if code is None and any(fnmatch.fnmatch(name, p) for p in sys.argv[1:]):
            print(name)
PY
        )
    fi
    echo "=== $module: ${files[$module]}, mutants ${patterns[*]} (${#names[@]} names to run); tests: ${tests[$module]} and the mutant-marked tests (${#selected[@]} files and test IDs)"
    begin=$SECONDS
    if ((${#names[@]})); then
        (cd "$work" && "$venv/bin/mutmut" run --max-children "$children" "${names[@]}") >"$work/run.log" 2>&1 || {
            tr '\r' '\n' <"$work/run.log" | tail -30 >&2
            echo "mutmut failed on $module (log: $work/run.log)" >&2
            exit 1
        }
    fi
    echo "$module: mutmut run took $((SECONDS - begin)) s"
    (cd "$work" && "$venv/bin/python" "$repo/scripts/mutation_report.py" "$venv" \
        "${selected[*]}" "${patterns[@]}")
done
