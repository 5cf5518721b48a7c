#!/usr/bin/env bash
# The documented cluster workflow (docs/cluster.md), end to end, over SSH, on this machine, as a user walks it
# on a machine shared with another Ray cluster (CI runs it after the test suite):
#
#   another Ray on Ray's default ports (started here, under its own temp dir) -> ray up cluster.local.yaml
#   with the shipped ports: refused on the node, naming the busy port and its setting -> the ports moved as
#   docs/cluster.md says for a shared machine -> ray up -> ray up again (as after editing the file) -> a
#   failing ray up (setup command exits 1), then ray up again, as docs/cluster.md says ->
#   ray submit (a 5-step train) -> ray job submit --working-dir . (a 5-step train, then the smoke tune,
#   twice) -> a Jobs API request without the token refused -> ray down -> no process of the cluster's user
#   left, and the other Ray untouched.
#
# The "cluster" is one head node: this machine, reached over SSH at 127.0.0.1 as a dedicated non-root user
# (docs/cluster.md: give the cluster its own user where other Ray work runs), through an sshd this script
# starts on 127.0.0.1:22 only. The cluster file is a copy of cluster.local.yaml with head_ip, ssh_user and
# ssh_private_key filled in and, from the second `ray up` on, its ports moved (each +100, workers
# 20002-29999), nothing else. The client is the checkout's .venv (the README's install command makes it).
#
# Where this differs from a user's machine (deviations, also listed in docs/cluster.md, "Tested in CI"):
# - the node user's pip gets this machine's pip configuration (here a wheelhouse with the CPU build of torch,
#   and no route to PyTorch's CPU index), as a site-wide pip.conf would give it on your machines;
# - the client (root) gets its own HOME (the auth token, not root's), RAY_TMPDIR and TMPDIR (the client's
#   cluster state and config cache, not /tmp/ray, which other Ray work on this machine uses);
# - `ray dashboard --port <free port>`: the client is on the head machine, whose dashboard port is the head's;
# - `ray up --no-config-cache`: every run starts clean.
#
# Needs root: installs openssh-server, rsync and python3-venv if missing, creates and removes the user,
# starts and stops the sshd. On any exit (trap): ray down, the user's processes, the sshd (by PID), the
# user, the other Ray (by its process group) and the temp files go. Every step has a time limit; each step's
# duration is printed (docs/cluster.md has a passing run's); exit 1 on any failure. Usage: bash scripts/test_ray_up.sh
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
user=tfrayup                          # the cluster's SSH user, made and removed here
state=/tmp/tokenforge-ray-up          # keys, sshd config/log/pid, the filled cluster file, client HOME
cfg_shipped_ports=$state/cluster-shipped-ports.yaml  # head_ip, ssh_user, ssh_private_key filled in
cfg=$state/cluster.yaml                              # and the ports moved off Ray's defaults
steps=()
started=$SECONDS
sshd_pid=
dash_pid=
other_pid=
cluster_up=0
control_dir=$(python3 -c 'import getpass, hashlib, sys  # where `ray` keeps its ssh control sockets for this cluster
h = lambda text: hashlib.sha256(text.encode()).hexdigest()[:10]
print("/tmp/ray_ssh_" + h(getpass.getuser()) + "/" + h(sys.argv[1]))' "$(sed -n 's/^cluster_name: *//p' "$repo/cluster.local.yaml")")

log() { echo "[test_ray_up $(date +%H:%M:%S)] $*"; }
fail() { log "FAILED: $*" >&2; exit 1; }

# step NAME LIMIT_S FUNCTION: run FUNCTION with a time limit, record its duration.
step() {
    local name=$1 limit=$2 fn=$3 begin=$SECONDS rc=0 note=""
    log "--- $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" bash -c "$(declare -f); set -euo pipefail; $fn" </dev/null || rc=$?
    ((rc == 0)) || note="  FAILED (exit $rc)"
    ((rc != 124)) || note="  FAILED (time limit ${limit}s)"
    steps+=("$(printf '%-52s %5ds%s' "$name" $((SECONDS - begin)) "$note")")
    ((rc == 0)) || fail "$name"
    log "--- $name: ok, $((SECONDS - begin))s"
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    log "cleanup"
    [[ -n $dash_pid ]] && kill -- "-$dash_pid" 2>/dev/null
    if ((cluster_up)); then timeout 180 ray down -y "$cfg" </dev/null >/dev/null 2>&1; fi
    if [[ -n $other_pid ]]; then  # the other Ray: its process group (setsid), nothing else
        kill -KILL -- "-$other_pid" 2>/dev/null
        for _ in $(seq 20); do pgrep -g "$other_pid" >/dev/null || break; sleep 0.5; done
    fi
    if id "$user" >/dev/null 2>&1; then
        pkill -KILL -u "$user" 2>/dev/null
        for _ in $(seq 20); do pgrep -u "$user" >/dev/null || break; sleep 0.5; done
        userdel -r "$user" 2>/dev/null
    fi
    if [[ -n $sshd_pid ]] && kill "$sshd_pid" 2>/dev/null; then wait "$sshd_pid" 2>/dev/null; fi
    rm -rf "$state" "$control_dir"  # the latter: ssh control sockets of `ray` for this cluster name
    rmdir "$(dirname "$control_dir")" 2>/dev/null
    echo
    echo "test_ray_up: step durations"
    printf '  %s\n' "${steps[@]}"
    printf '  %-52s %5ds\n' "total" $((SECONDS - started))
    if ((rc == 0)); then echo "test_ray_up: PASSED"; else echo "test_ray_up: FAILED (exit $rc)"; fi
    exit "$rc"
}

[[ $(id -u) == 0 ]] || fail "run as root: this test creates a user and starts an sshd on 127.0.0.1:22"
[[ -x $repo/.venv/bin/ray ]] || fail "no $repo/.venv: run the README's install command first"
trap cleanup EXIT
trap 'exit 130' INT TERM

# Leftovers of an earlier run that was killed before its trap ran: its sshd (by the PID it recorded), its user.
if [[ -f $state/sshd.pid ]] && grep -qs "$state/sshd_config" "/proc/$(cat "$state/sshd.pid")/cmdline"; then
    kill "$(cat "$state/sshd.pid")"
fi
if id "$user" >/dev/null 2>&1; then
    pkill -KILL -u "$user" || true
    sleep 1
    userdel -r "$user" 2>/dev/null || true
fi
rm -rf "$state"
mkdir -m 700 "$state"

# The node's pip gets the sources this machine's pip has (on this project's CI machine: a wheelhouse with the
# CPU build of torch, and no route to PyTorch's CPU index), as a site-wide pip.conf gives them on your machines.
pip_config=$("$repo/.venv/bin/pip" config list 2>/dev/null || true)
torch_version=$(sed -n 's/^torch==\([^ #]*\).*/\1/p' "$repo/constraints.txt")
if "$repo/.venv/bin/pip" install -q --dry-run --no-deps --ignore-installed "torch==$torch_version+cpu" >/dev/null 2>&1; then
    log "pip's sources here hold torch $torch_version+cpu: the head installs it from them"
else
    log "no torch $torch_version+cpu in pip's sources here: the head fetches it from PyTorch's CPU index (needs that host)"
fi
export pip_config

# The client: the checkout's venv; its own HOME (the token `ray get-auth-token` makes), RAY_TMPDIR (the local
# provider's cluster state) and TMPDIR (ray's config cache); usage stats off here and, through `ray up`, on the node.
export HOME=$state/client-home RAY_TMPDIR=$state/client-tmp TMPDIR=$state/client-tmp RAY_USAGE_STATS_ENABLED=0
export PATH=$repo/.venv/bin:$PATH
unset RAY_ADDRESS RAY_AUTH_MODE RAY_AUTH_TOKEN RAY_AUTH_TOKEN_PATH VIRTUAL_ENV
mkdir -p "$HOME" "$RAY_TMPDIR"
export repo user state cfg cfg_shipped_ports
cd "$repo"

prerequisites() {
    local missing=()
    command -v rsync >/dev/null || missing+=(rsync)
    command -v ssh >/dev/null || missing+=(openssh-client)
    [[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
    /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    command -v useradd >/dev/null || missing+=(passwd)
    if ((${#missing[@]})); then
        echo "installing: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    rsync --version | sed -n 1p
    ssh -V
}

make_user() {
    useradd --create-home --shell /bin/bash "$user"
    usermod -p '*' "$user"  # no password, not locked: key login only
    local home
    home=$(getent passwd "$user" | cut -d: -f6)
    install -d -m 700 -o "$user" -g "$user" "$home/.ssh"
    ssh-keygen -q -t ed25519 -N '' -C tokenforge-test-ray-up -f "$state/id_ed25519"
    install -m 600 -o "$user" -g "$user" "$state/id_ed25519.pub" "$home/.ssh/authorized_keys"
    install -d -m 755 -o "$user" -g "$user" "$home/.config" "$home/.config/pip"
    python - "$home/.config/pip/pip.conf" <<'EOF'
import os, re, sys
values = {}  # `pip config list`: environment first (it wins), then the config files
for line in os.environ["pip_config"].splitlines():
    match = re.match(r"^[^.]+\.([\w-]+)='(.*)'$", line)
    if match:
        values.setdefault(match.group(1), match.group(2))
with open(sys.argv[1], "w") as f:
    f.write("[global]\n" + "".join(f"{key} = {value}\n" for key, value in values.items()))
print("node pip.conf:", ", ".join(f"{k}={v}" for k, v in values.items()) or "(empty)")
EOF
    chown "$user:$user" "$home/.config/pip/pip.conf"
    ssh-keygen -q -t ed25519 -N '' -f "$state/ssh_host_ed25519_key"
    # An sshd of our own on 127.0.0.1 only, for this user only.
    cat > "$state/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port 22
HostKey $state/ssh_host_ed25519_key
PidFile $state/sshd.pid
AllowUsers $user
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
UsePAM no
X11Forwarding no
AllowTcpForwarding local
EOF
    if (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null; then
        echo "127.0.0.1:22 is taken: this test starts its own sshd there (Ray's cluster launcher has no SSH port setting)" >&2
        return 1
    fi
}

start_sshd() {
    mkdir -p /run/sshd
    /usr/sbin/sshd -D -f "$state/sshd_config" -E "$state/sshd.log" </dev/null &
    sshd_pid=$!
    for _ in $(seq 50); do
        (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null && return 0
        kill -0 "$sshd_pid" 2>/dev/null || break
        sleep 0.2
    done
    cat "$state/sshd.log" >&2
    fail "sshd did not start"
}

fill_cluster_file() {
    # Copies of cluster.local.yaml: head_ip, ssh_user and ssh_private_key filled in; then also the ports moved
    # as docs/cluster.md says for a machine shared with another Ray (each +100, workers 20002-29999).
    python - "$repo/cluster.local.yaml" "$cfg_shipped_ports" "$cfg" "$user" "$state/id_ed25519" <<'EOF'
import copy, re, sys, yaml
source, shipped_ports, moved_ports, user, key = sys.argv[1:]
shipped = yaml.safe_load(open(source))
config = copy.deepcopy(shipped)
config["provider"]["head_ip"] = "127.0.0.1"
config["auth"].update(ssh_user=user, ssh_private_key=key)
yaml.safe_dump(config, open(shipped_ports, "w"), sort_keys=False)
def move(command):
    command = re.sub(r"((?:-port|_PORT)=|\$RAY_HEAD_IP:)(\d+)", lambda m: m.group(1) + str(int(m.group(2)) + 100), command)
    command = re.sub(r"--min-worker-port=\d+", "--min-worker-port=20002", command)
    return re.sub(r"--max-worker-port=\d+", "--max-worker-port=29999", command)
for key_ in ("head_start_ray_commands", "worker_start_ray_commands"):
    config[key_] = [move(c) for c in config[key_]]
yaml.safe_dump(config, open(moved_ports, "w"), sort_keys=False)
print("moved:", [c for c in config["head_start_ray_commands"] if "ray start" in c][0].split("ray start", 1)[1])
filled = yaml.safe_load(open(moved_ports))
for c in (shipped, filled):
    del c["provider"]["head_ip"], c["auth"]["ssh_user"], c["auth"]["ssh_private_key"]
    for key_ in ("head_start_ray_commands", "worker_start_ray_commands"):
        c[key_] = [re.sub(r"\d+", "N", command) for command in c[key_]]
assert filled == shipped, "only head_ip, ssh_user, ssh_private_key and the port numbers may differ"
EOF
    # docs/cluster.md: the token, made on this machine (left 0644 here: the node must make its copy 0600).
    ray get-auth-token --generate >/dev/null
    echo "local token file mode: $(stat -c %a "$HOME/.ray/auth_token")"
    tokenforge validate-cluster "$cfg_shipped_ports"
    tokenforge validate-cluster "$cfg"
}

# Another Ray cluster on this machine, on Ray's default ports (6379, 8265, 10001, 52365, 44217, 44227, workers
# from 10002), as another user's would be: in a process group of its own (setsid) and a temp dir of its own.
start_other_ray() {
    mkdir -p "$state/other-ray"
    RAY_TMPDIR=$state/other-ray setsid ray start --head --disable-usage-stats </dev/null >"$state/other-ray.log" 2>&1 &
    other_pid=$!
}
other_ray_listens() {
    for _ in $(seq 90); do
        python - <<'EOF' && return 0
import socket, sys
def listening(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0
sys.exit(0 if all(listening(p) for p in (6379, 8265, 10001, 52365)) else 1)
EOF
        sleep 1
    done
    cat "$state/other-ray.log" >&2
    return 1
}
other_ray_alive() { pgrep -g "$other_pid" -f gcs_server >/dev/null; }

ray_up_refused_on_busy_ports() {
    local rc=0
    ray up -y --no-config-cache "$cfg_shipped_ports" >"$state/up-refused.log" 2>&1 || rc=$?
    grep -a "check_ports: " "$state/up-refused.log" | tr -d '\r' | sort -u
    ((rc != 0)) || { echo "ray up succeeded on ports another Ray holds" >&2; return 1; }
    grep -aq "check_ports: port 6379 (GCS) is in use on .*; choose a free port for --port= in the cluster file's head_start_ray_commands" "$state/up-refused.log" \
        || { tail -30 "$state/up-refused.log" >&2; return 1; }
    grep -aq "check_ports: port 52365 (dashboard agent (HTTP: job submission)) is in use" "$state/up-refused.log"
}

ray_up() {
    ray up -y --no-config-cache "$cfg"
}

ray_up_again() {  # as after editing the cluster file: Ray restarts on the head
    ray up -y --no-config-cache "$cfg"
    on_head 'ray status >/dev/null && echo CHECK status=ok' | grep -qx "CHECK status=ok"
}

# docs/cluster.md, "After a failed `ray up`": a `ray up` that fails on the running cluster (here a setup command
# that exits 1) leaves Ray running and the head tagged update-failed, which `ray down` would take for "no head"
# and leave Ray running; `ray up` again (the documented safe way) makes the head up-to-date, so `ray down` (later)
# stops it, checked by the last step.
ray_up_failed_then_again() {
    local state_file=$RAY_TMPDIR/ray/cluster-$(sed -n 's/^cluster_name: *//p' "$cfg").state
    python - "$cfg" "$state/cluster-failing.yaml" <<'EOF2'
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
config["setup_commands"] = config["setup_commands"] + ["false"]
yaml.safe_dump(config, open(sys.argv[2], "w"), sort_keys=False)
EOF2
    if ray up -y --no-config-cache "$state/cluster-failing.yaml" >"$state/up-failing.log" 2>&1; then
        echo "ray up with a failing setup command succeeded" >&2
        return 1
    fi
    grep -q '"ray-node-status": "update-failed"' "$state_file" || { cat "$state_file" >&2; return 1; }
    ray up -y --no-config-cache "$cfg"
    grep -q '"ray-node-status": "up-to-date"' "$state_file" || { cat "$state_file" >&2; return 1; }
}

# `ray exec` prints ssh chatter around a command's output: checks print "CHECK key=value" and grep for it.
on_head() { ray exec "$cfg" "$1" 2>&1 | tr -d '\r'; }

check_head() {
    local out
    out=$(on_head 'ray status >/dev/null && echo CHECK status=ok; echo CHECK token=$(stat -c %a ~/.ray/auth_token); echo CHECK python=$(command -v python); echo CHECK torch=$(python -c "import torch; print(torch.__version__)"); echo CHECK nvidia=$(pip list 2>/dev/null | grep -ci "^nvidia-"); echo CHECK shipped=$(ls -A ~/tokenforge | grep -cx -e .venv -e .git -e runs -e tune_results); echo CHECK tmpdir=$RAY_TMPDIR; echo CHECK gcs=$(cat $RAY_TMPDIR/ray/ray_current_cluster)')
    echo "$out" | grep '^CHECK'
    for want in "status=ok" "token=600" "python=/home/$user/tokenforge-venv/bin/python" "torch=.*+cpu" "nvidia=0" "shipped=0" \
        "tmpdir=/home/$user/.tokenforge-ray" "gcs=.*:6479"; do
        grep -qx "CHECK $want" <<<"$out" || fail "on the head: expected $want"
    done
    # The dashboard / Jobs API listens on 127.0.0.1 only.
    python - <<'EOF'
import ipaddress
addresses = set()  # local addresses of LISTEN sockets on port 8265, from the kernel's tables
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).readlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host, port = local.split(":")
        if state == "0A" and int(port, 16) == 8365:
            raw = bytes.fromhex(host)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian 32-bit words
            addresses.add(str(ipaddress.ip_address(raw)))
print("the head's dashboard (8365) listens on", sorted(addresses))
assert addresses == {"127.0.0.1"}, addresses
EOF
}

submit_train() {
    ray submit "$cfg" scripts/cluster_entry.py -- train trainer.total_steps=5 trainer.eval_every=5 \
        trainer.prompts_per_step=8 rollout.group_size=4 data.max_eval_samples=50
    local out
    out=$(on_head 'echo CHECK steps=$(python -c "import json, sys; print([json.loads(l)[\"step\"] for l in open(sys.argv[1])])" ~/tokenforge-outputs/runs/default/metrics.jsonl | tr -d " ")')
    grep -qx 'CHECK steps=\[0,1,2,3,4,5\]' <<<"$out" || fail "train: no 5-step metrics.jsonl under ~/tokenforge-outputs/runs/default: $out"
    echo "steps 0-5 in ~/tokenforge-outputs/runs/default/metrics.jsonl"
    # docs/cluster.md: fetch the run.
    # shellcheck disable=SC2088  # a path on the head
    mkdir -p "$state/from-cluster"
    ray rsync-down "$cfg" '~/tokenforge-outputs/runs/default' "$state/from-cluster/"
    [[ -s $state/from-cluster/default/metrics.jsonl ]] || fail "ray rsync-down: no $state/from-cluster/default/metrics.jsonl"
    echo "ray rsync-down fetched the run: $(find "$state/from-cluster" -type f | wc -l) files"
}

dashboard_port() { cat "$state/dashboard.port"; }

submit_train_job() {  # a 5-step train through the Jobs API; relative output_dir: a new run beside ray submit's
    RAY_ADDRESS=http://127.0.0.1:$(dashboard_port)
    export RAY_ADDRESS RAY_AUTH_MODE=token
    ray job submit --working-dir . -- tokenforge train trainer.total_steps=5 trainer.eval_every=5 \
        trainer.prompts_per_step=8 rollout.group_size=4 data.max_eval_samples=50 | tee "$state/train-job.log" | tail -5
    grep "^tokenforge: " "$state/train-job.log" || true
    grep -q "/home/$user/tokenforge-outputs/runs/default-2" "$state/train-job.log" \
        || fail "train job: the run is not in ~/tokenforge-outputs/runs/default-2"
    local out
    out=$(on_head 'echo CHECK steps=$(python -c "import json, sys; print([json.loads(l)[\"step\"] for l in open(sys.argv[1])])" ~/tokenforge-outputs/runs/default-2/metrics.jsonl | tr -d " ")')
    grep -qx 'CHECK steps=\[0,1,2,3,4,5\]' <<<"$out" || fail "train job: no 5-step metrics.jsonl: $out"
}

submit_tune() {  # submit_tune N: the smoke tune through the Jobs API, as docs/cluster.md says
    RAY_ADDRESS=http://127.0.0.1:$(dashboard_port)
    export RAY_ADDRESS RAY_AUTH_MODE=token
    ray job submit --working-dir . -- tokenforge tune tune_configs/smoke.yaml | tee "$state/tune$1.log" | grep -v '^\s*$' | tail -25
    grep "^tokenforge: " "$state/tune$1.log" || true
    grep -q "tune.storage_path/tune.name tune_results/smoke -> /home/$user/tokenforge-outputs/tune_results/$2 " "$state/tune$1.log" \
        || fail "tune $1: results not in ~/tokenforge-outputs/tune_results/$2"
    local out
    out=$(on_head "echo CHECK trials=\$(grep -c ',12,TERMINATED' ~/tokenforge-outputs/tune_results/$2/trials.csv)")
    grep -qx 'CHECK trials=2' <<<"$out" || fail "tune $1: expected 2 finished trials in ~/tokenforge-outputs/tune_results/$2/trials.csv: $out"
    local succeeded
    succeeded=$(ray job list | grep "JobType.SUBMISSION" | grep -c "JobStatus.SUCCEEDED" || true)
    echo "ray job list: $succeeded succeeded job(s)"
    ((succeeded == $1 + 1)) || fail "ray job list: expected $(($1 + 1)) succeeded job(s) (the train, then $1 tune(s))"
}
submit_tune_1() { submit_tune 1 smoke; }
submit_tune_2() { submit_tune 2 smoke-2; }

jobs_api_auth() {
    python - "$(dashboard_port)" "$HOME/.ray/auth_token" <<'EOF'
import sys, urllib.error, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/api/jobs/"
def status(token):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
codes = {"no token": status(None), "wrong token": status("0" * 32), "the token": status(open(sys.argv[2]).read().strip())}
print(codes)
assert codes["no token"] in (401, 403) and codes["wrong token"] in (401, 403) and codes["the token"] == 200, codes
EOF
}

ray_down() {
    ray down -y "$cfg"
}

nothing_left() {
    for _ in $(seq 60); do  # ssh's ControlPersist keeps a session open ~10 s after the last command
        if ! pgrep -u "$user" >/dev/null; then
            echo "no process of $user left"
            other_ray_alive || { echo "the other Ray's GCS is gone: ray down touched it" >&2; return 1; }
            echo "the other Ray (process group $other_pid) still runs"
            return 0
        fi
        sleep 1
    done
    ps -u "$user" -o pid,etime,args >&2
    return 1
}

step "prerequisites (openssh-server, rsync, python3-venv)" 300 prerequisites
step "user $user, key pair, sshd config" 60 make_user
start_sshd
log "sshd on 127.0.0.1:22, PID $sshd_pid"
start_other_ray
export other_pid
step "another Ray on the default ports (process group $other_pid)" 120 other_ray_listens
step "cluster files, auth token, validate-cluster" 120 fill_cluster_file
cluster_up=1
step "ray up, the shipped ports: refused, naming the busy port" 900 ray_up_refused_on_busy_ports
step "ray up, ports moved" 600 ray_up
step "ray up again (a running cluster)" 600 ray_up_again
step "ray up failing (setup command), ray up again" 600 ray_up_failed_then_again
step "head: ray status, token 0600, venv, CPU torch, excludes, temp dir" 180 check_head
step "ray submit: 5-step train" 300 submit_train

# `ray dashboard` (an SSH port-forward) in its own process group, stdin from /dev/null so that the shell does
# not stop it; the head's dashboard is on 8365 (ports moved); a free local port because the client is on the head.
python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' > "$state/dashboard.port"
setsid ray dashboard --port "$(dashboard_port)" --remote-port 8365 "$cfg" </dev/null >"$state/dashboard.log" 2>&1 &
dash_pid=$!
wait_dashboard() {
    for _ in $(seq 60); do
        python -c "import sys, urllib.request, urllib.error
try: urllib.request.urlopen('http://127.0.0.1:$(dashboard_port)/api/version', timeout=5)
except urllib.error.HTTPError: pass" 2>/dev/null && return 0
        sleep 1
    done
    cat "$state/dashboard.log" >&2
    return 1
}
step "ray dashboard: port-forward" 90 wait_dashboard
step "ray job submit: 5-step train" 300 submit_train_job
step "ray job submit: smoke tune" 600 submit_tune_1
step "ray job submit: smoke tune again" 600 submit_tune_2
step "Jobs API: no token / wrong token refused" 60 jobs_api_auth
kill -- "-$dash_pid" 2>/dev/null || true
dash_pid=
step "ray down" 180 ray_down
cluster_up=0
step "nothing of $user left running; the other Ray untouched" 90 nothing_left
