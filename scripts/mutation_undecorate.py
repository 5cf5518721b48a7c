"""Rewrite a copy of a module so that mutmut 3 mutates its decorated functions (used by scripts/mutation_test.sh).

mutmut 3 leaves every function under a decorator other than @staticmethod/@classmethod unmutated. In the copy
under .mutation/, this moves the decorators that matter here (the registries register_estimator/register_loss,
and @torch.no_grad()) to the end of the module, where they wrap the same functions:

    @register_loss("reinforce")             def _reinforce_loss(...): ...
    def _reinforce_loss(...): ...     ->    ...
                                            _reinforce_loss = register_loss("reinforce")(_reinforce_loss)

The module behaves the same (registries are filled when its import finishes, before anything reads them).
usage: python mutation_undecorate.py FILE   (rewrites FILE in place)
"""

import re
import sys

DECORATOR = re.compile(r"^(\s*)@((?:register_estimator|register_loss|torch\.no_grad)\(.*\))\s*$")
path = sys.argv[1]
lines = open(path).read().splitlines()
out, moved, owner = [], [], None
for i, line in enumerate(lines):
    if re.match(r"^class (\w+)", line):
        owner = re.match(r"^class (\w+)", line).group(1)
    elif re.match(r"^\S", line):
        owner = None
    found = DECORATOR.match(line)
    following = re.match(r"^(\s*)def (\w+)\(", lines[i + 1]) if found and i + 1 < len(lines) else None
    if found and following and following.group(1) == found.group(1):
        target = following.group(2) if not found.group(1) else f"{owner}.{following.group(2)}"
        moved.append(f"{target} = {found.group(2)}({target})")
        continue
    out.append(line)
open(path, "w").write("\n".join(out + ["", "", "# moved here by scripts/mutation_undecorate.py", *moved]) + "\n")
print(f"{path}: moved {len(moved)} decorators")
