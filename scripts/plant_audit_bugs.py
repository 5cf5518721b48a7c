"""Plant one of the audit's six bugs (issue 19) into a scratch copy of the code, to show that the suite catches it.

usage: python scripts/plant_audit_bugs.py COPY_ROOT N     (N = 1..6; never run it on your worktree)

    git ls-files -z | xargs -0 -I{} cp --parents {} /tmp/bug1/ && python scripts/plant_audit_bugs.py /tmp/bug1 1
    cd /tmp/bug1 && python -m pytest -q tests/test_advantages.py ... tests/test_data.py

docs/testing.md lists the test(s) each bug fails.
"""

import pathlib
import sys

EDITS = {
    1: (  # the reference model copies the policy weights after every step
        "actors/learner.py",
        "                    self.optimizer.step()\n",
        "                    self.optimizer.step()\n"
        "                    if self.reference is not None:  # PLANTED: the reference copies the policy\n"
        "                        self.reference.load_state_dict(self.model.state_dict())\n",
    ),
    2: (  # the sign of the KL penalty in the reward flipped
        "actors/learner.py",
        "token_rewards = token_rewards - algo.kl_in_reward_coef * kl * mask",
        "token_rewards = token_rewards + algo.kl_in_reward_coef * kl * mask",
    ),
    3: (  # the per-component `normalize` setting ignored by the learner
        "actors/learner.py",
        "mode = self.config.reward.components[name].normalize",
        'mode = "none"',
    ),
    4: (  # PPO's clip_low ignored
        "pipeline/algorithm/loss.py",
        "ratio.clamp(1.0 - clip_low, 1.0 + clip_high)",
        "ratio.clamp(max=1.0 + clip_high)",
    ),
    5: (  # the classifier's logit output replaced by a log-softmax
        "pipeline/rewards/components.py",
        'logits.softmax(-1) if self.options.output == "probability" else logits',
        'logits.softmax(-1) if self.options.output == "probability" else logits.log_softmax(-1)',
    ),
    6: (  # ROUGE's hypothesis and reference swapped
        "pipeline/rewards/components.py",
        "self.scorer.score(r, c)[o.rouge_type]",
        "self.scorer.score(c, r)[o.rouge_type]",
    ),
}

if __name__ == "__main__":
    root, bug = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    path, old, new = EDITS[bug]
    source = (root / path).read_text()
    if source.count(old) != 1:
        sys.exit(f"bug {bug}: expected exactly one {old!r} in {path}, found {source.count(old)}")
    (root / path).write_text(source.replace(old, new))
    print(f"bug {bug} planted in {root / path}")
