#!/usr/bin/env bash
# Comparative suite: hello_http under `cluster` against the same program as
# one multi-threaded process, Node's cluster module and nginx, all with 2
# workers/threads and the same `200 Hello, World!` keep-alive answer; then
# `cluster` reloading under load, then what `cluster` costs (watcher CPU and
# RSS, per-worker RSS, time to all workers serving). amphp/cluster is not
# run (PHP + Composer packages); the output says so.
#
#   apt-get install wrk nodejs nginx curl    # Debian/Ubuntu (valgrind too for `profile`)
#   bash benches/compare/run.sh              # compare + reload + cost (~9.5 min with 5 --balance modes)
#   bash benches/compare/run.sh compare      # only the throughput table
#   ONLY='^cluster' bash benches/compare/run.sh compare   # baseline and the cluster rows
#   bash benches/compare/run.sh reload       # only reload under load
#   bash benches/compare/run.sh cost         # only the cost figures
#   bash benches/compare/run.sh profile      # callgrind: instructions per request, worker vs standalone (~1 min)
#   FULL=1 bash benches/compare/run.sh       # also a second pass at 256 connections (~16 min)
#
# Environment: ROUNDS (5), DURATION (10s), CONNS (32), FULL (0: 256
# connections as a second pass when 1), WORKERS (2), WARMUP (3s),
# RELOADS (10), PAUSE (1), IDLE (10: seconds of idle for the watcher's CPU),
# STARTS (5), ONLY (an extended regex: run only the servers whose label
# matches, besides the baseline), PROFILE_SECS (5). Tables go to stdout,
# progress to stderr.
#
# Every server runs in its own session/process group on a free 127.0.0.1 port;
# all of them are stopped (TERM, then KILL, process groups and every
# descendant) on exit, error or ^C. wrk runs on the same machine, so it takes
# about one core: compare ratios from one run, not absolute numbers.
set -euo pipefail

MODE=${1:-all}
case "$MODE" in all|compare|reload|cost|profile) ;; *)
  echo "usage: $0 [all|compare|reload|cost|profile]" >&2; exit 2 ;;
esac
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
FULL=${FULL:-0}
WORKERS=${WORKERS:-2}
WARMUP=${WARMUP:-3s}
RELOADS=${RELOADS:-10}
PAUSE=${PAUSE:-1}
IDLE=${IDLE:-10}
STARTS=${STARTS:-5}

HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../.."
CLUSTER=target/release/cluster
HELLO=target/release/examples/hello_http

log() { echo "$*" >&2; }
for tool in wrk curl setsid; do
  command -v "$tool" >/dev/null || { log "$tool not found (Debian: apt-get install wrk curl util-linux)"; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/cluster-compare.XXXXXX")
groups=()     # process groups we started (each server is a session leader)
wrk_pid=

# Every live descendant of pid $1 (children of all its threads, recursively).
descendants() {
  local p c
  for p in "$@"; do
    for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do
      echo "$c"; descendants "$c"
    done
  done
}
# True while one of the pids runs (a zombie does not count).
alive() {
  local p st
  for p in "$@"; do
    st=$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$p/stat" 2>/dev/null) || continue
    [ -n "$st" ] && [ "$st" != Z ] && return 0
  done
  return 1
}

# Stop the process group $1 and every descendant of its leader (workers of
# `cluster` are in process groups of their own): TERM, up to 12 s, then KILL.
stop_group() {
  local g=$1 all
  [[ "$g" =~ ^[0-9]+$ ]] && [ "$g" -gt 1 ] || return 0
  all=("$g" $(descendants "$g"))
  kill -TERM -- "-$g" 2>/dev/null || true
  for _ in $(seq 120); do alive "${all[@]}" || break; sleep 0.1; done
  kill -KILL -- "-$g" 2>/dev/null || true
  kill -KILL "${all[@]}" 2>/dev/null || true
  wait "$g" 2>/dev/null || true
}
cleanup() {
  trap - EXIT INT TERM
  [ -n "$wrk_pid" ] && kill -TERM "$wrk_pid" 2>/dev/null || true
  local g
  for g in "${groups[@]}"; do stop_group "$g"; done
  groups=()
  rm -rf "$work"
}
trap cleanup EXIT
trap 'log "interrupted; stopping servers"; cleanup; exit 130' INT TERM

# Start "$@" in a new session (a non-interactive shell's background job is not
# a group leader, so setsid execs in place: $! is the pid and the pgid).
# Output goes to $work/<name>.log.
LAST_PID=
start() { # name cmd...
  local name=$1; shift
  setsid "$@" >>"$work/$name.log" 2>&1 </dev/null &
  LAST_PID=$!
  groups+=("$LAST_PID")
}
stop() { # pgid
  local g=$1 keep=() x
  stop_group "$g"
  for x in "${groups[@]}"; do [ "$x" = "$g" ] || keep+=("$x"); done
  groups=("${keep[@]}")
}

free_port() {
  if command -v python3 >/dev/null; then
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
  else
    local p
    while :; do
      p=$(( 20000 + RANDOM % 40000 ))
      ss -Htan "sport = :$p" 2>/dev/null | grep -q . || { echo "$p"; return; }
    done
  fi
}
wait_http() { # port pid
  for _ in $(seq 200); do
    curl -fs -o /dev/null "http://127.0.0.1:$1/" && return 0
    alive "$2" || break
    sleep 0.05
  done
  return 1
}
secs() { # 10s, 1m, 500ms -> seconds
  awk -v d="$1" 'BEGIN { n = d + 0; if (d ~ /ms$/) n /= 1000; else if (d ~ /m$/) n *= 60; else if (d ~ /h$/) n *= 3600; print n }'
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
minimum() { printf '%s\n' "$@" | sort -g | head -1; }
maximum() { printf '%s\n' "$@" | sort -g | tail -1; }
paired() { # "a1 a2 ..." "b1 b2 ...": median of a_r / b_r
  median $(awk -v a="$1" -v b="$2" 'BEGIN { n = split(a, x, " "); split(b, y, " "); for (i = 1; i <= n; i++) if (y[i] > 0) printf "%.4f\n", x[i] / y[i] }') | awk '{printf "%.3f", $1}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "-" }'; }

# wrk in the background (so a signal reaches our trap at once); sets
# WRK_RPS, WRK_TOTAL, WRK_ERRORS (socket errors), WRK_NON2XX.
run_wrk() { # port conns duration [header]
  local out="$work/wrk.out" header=()
  [ -n "${4:-}" ] && header=(-H "$4")
  wrk -t1 -c"$2" -d"$3" "${header[@]}" "http://127.0.0.1:$1/" >"$out" 2>&1 &
  wrk_pid=$!
  wait "$wrk_pid" || true
  wrk_pid=
  WRK_RPS=$(awk '/Requests\/sec/ {print $2}' "$out"); WRK_RPS=${WRK_RPS:-0}
  WRK_TOTAL=$(awk '/requests in/ {print $1}' "$out"); WRK_TOTAL=${WRK_TOTAL:-0}
  WRK_ERRORS=$(awk '/Socket errors/ {gsub(",",""); print $4+$6+$8+$10}' "$out"); WRK_ERRORS=${WRK_ERRORS:-0}
  WRK_NON2XX=$(awk '/Non-2xx/ {print $5}' "$out"); WRK_NON2XX=${WRK_NON2XX:-0}
}

# /proc figures. CPU in clock ticks (utime + stime), memory in KiB.
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
status_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
cpu_pct() { awk -v t="$1" -v s="$2" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f (%d ms)", 100 * t / hz / s, 1000 * t / hz }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# CPU ticks spent by each pid during the measured wrk runs only:
# count_cpu - PIDS... before a run, count_cpu + PIDS... after it.
declare -A TICKS=()
count_cpu() {
  local sign=$1 p t; shift
  for p in "$@"; do
    t=$(cpu_ticks "$p" 2>/dev/null) || continue
    TICKS[$p]=$(( ${TICKS[$p]:-0} $sign t ))
  done
}

machine() {
  echo "$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) RAM, $(uname -sr)"
}

log "building: cargo build --release --examples --bin cluster"
cargo build --release --quiet --examples --bin cluster

echo "# benches/compare/run.sh $MODE, $(date -u '+%F %H:%M UTC')"
echo "# $(machine)"
echo "# $("$CLUSTER" --version 2>/dev/null || echo cluster), $(node --version 2>/dev/null | sed 's/^/node /' || echo 'no node'), $(nginx -v 2>&1 | sed 's/.*: //' || true), $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)"

# --balance MODE values, if this `cluster` has the option: from its help
# (clap lists them as "- name: ..." lines or "[possible values: a, b]"), else
# from the error an invalid value gets ("... (a, b, c)"); the default mode
# ("[default: x]", what plain `cluster` runs) is left out.
balance_modes() {
  local help modes def
  help=$("$CLUSTER" --help 2>/dev/null | awk '
    /^ *(-[A-Za-z], )?--balance/ { on = 1 }
    on && /^ *(-[A-Za-z], )?--[a-z]/ && !/^ *(-[A-Za-z], )?--balance/ { exit }
    on { print }')
  def=$(grep -o '\[default: [^]]*\]' <<<"$help" | head -1 | sed 's/^\[default: //; s/\]$//')
  modes=$(awk '
    /^ *- [A-Za-z0-9_-]+:/ { s = $0; sub(/^ *- /, "", s); sub(/:.*/, "", s); print s }
    /\[possible values:/ { s = $0; sub(/.*\[possible values: */, "", s); sub(/\].*/, "", s); gsub(/,/, " ", s); n = split(s, a, " "); for (i = 1; i <= n; i++) print a[i] }
  ' <<<"$help")
  if [ -z "$modes" ]; then
    # A program that cannot start, in case the value were accepted after all.
    modes=$(timeout 5 "$CLUSTER" --workers 1 --balance '%invalid%' -- /nonexistent/cluster-compare 2>&1 >/dev/null |
      grep -o '\[possible values: [^]]*\]\|([a-z0-9_-]\+\(, [a-z0-9_-]\+\)\+)' | tail -1 |
      sed 's/^\[possible values: //; s/^(//; s/[])]$//' | tr ',' '\n' | tr -d ' ') || true
  fi
  printf '%s\n' $modes | awk -v def="$def" 'NF && $0 != def && !seen[$0]++'
}
has_balance() { "$CLUSTER" --help 2>/dev/null | grep -q -- '--balance'; }

########################################################################
# 1. Throughput against the alternatives.
########################################################################
compare() {
  local names=() ports=() pids=() skipped=() res=() errs=() kids=()
  add_server() { # label pid port
    if [ -n "${ONLY:-}" ] && [ "${#names[@]}" -gt 0 ] && ! grep -Eq -- "$ONLY" <<<"$1"; then
      stop "$2"; return
    fi
    if wait_http "$3" "$2"; then
      names+=("$1"); pids+=("$2"); ports+=("$3")
    else
      log "$1 did not answer on port $3; its log:"; tail -5 "$work"/*.log >&2 || true
      skipped+=("$1: did not start (see its log)"); stop "$2"
    fi
  }
  local port
  port=$(free_port)
  start baseline env HELLO_THREADS="$WORKERS" "$HELLO" "127.0.0.1:$port"
  add_server "hello_http standalone, $WORKERS threads" "$LAST_PID" "$port"

  port=$(free_port)
  start cluster "$CLUSTER" --workers "$WORKERS" --log-level warn "$HELLO" "127.0.0.1:$port"
  add_server "cluster --workers $WORKERS" "$LAST_PID" "$port"
  if has_balance; then
    local m
    for m in $(balance_modes); do
      port=$(free_port)
      start "cluster-$m" "$CLUSTER" --workers "$WORKERS" --balance "$m" --log-level warn "$HELLO" "127.0.0.1:$port"
      add_server "cluster --workers $WORKERS --balance $m" "$LAST_PID" "$port"
    done
  else
    skipped+=("cluster --balance: this cluster has no --balance option (shared accept queue only)")
  fi

  if command -v node >/dev/null; then
    port=$(free_port)
    start node node benches/compare/node_cluster.js "$port" "$WORKERS"
    add_server "node cluster, $WORKERS workers (rr)" "$LAST_PID" "$port"
  else
    skipped+=("node cluster: node not found (apt-get install nodejs)")
  fi

  if command -v nginx >/dev/null; then
    port=$(free_port)
    local np="$work/nginx" user=""
    mkdir -p "$np"
    [ "$(id -u)" = 0 ] && user="user $(id -un) $(id -gn);"
    sed -e "s|@PREFIX@|$np|g" -e "s|@PORT@|$port|g" -e "s|@WORKERS@|$WORKERS|g" -e "s|@USER@|$user|g" \
      benches/compare/nginx.conf >"$np/nginx.conf"
    start nginx nginx -p "$np" -e "$np/error.log" -c "$np/nginx.conf"
    add_server "nginx, $WORKERS worker processes" "$LAST_PID" "$port"
  else
    skipped+=("nginx: nginx not found (apt-get install nginx)")
  fi
  skipped+=("amphp/cluster: not run (needs PHP 8.1+ and Composer packages from Packagist; not installable on this machine)")

  local i
  for i in "${!names[@]}"; do
    log "warm-up ($WARMUP): ${names[$i]}"
    run_wrk "${ports[$i]}" "$CONNS" "$WARMUP"
  done

  local passes=("$CONNS")
  [ "$FULL" = 1 ] && [ "$CONNS" != 256 ] && passes+=(256)
  local conns
  for conns in "${passes[@]}"; do
    res=(); errs=(); TICKS=()
    for i in "${!names[@]}"; do
      res[$i]=""; errs[$i]=0
      kids[$i]=$(cat /proc/"${pids[$i]}"/task/*/children 2>/dev/null | tr '\n' ' ')
    done
    local r order
    for r in $(seq "$ROUNDS"); do
      # Odd rounds in order, even rounds reversed: linear drift hits all alike.
      if (( r % 2 )); then order=$(seq 0 $(( ${#names[@]} - 1 ))); else order=$(seq $(( ${#names[@]} - 1 )) -1 0); fi
      local line="round $r/$ROUNDS (c$conns):"
      for i in $order; do
        alive "${pids[$i]}" || { log "${names[$i]} exited during the run"; exit 1; }
        count_cpu - "${pids[$i]}" ${kids[$i]}
        run_wrk "${ports[$i]}" "$conns" "$DURATION"
        count_cpu + "${pids[$i]}" ${kids[$i]}
        res[$i]="${res[$i]} $WRK_RPS"
        errs[$i]=$(( errs[$i] + WRK_ERRORS + WRK_NON2XX ))
        line="$line ${names[$i]%%,*}=$WRK_RPS"
      done
      log "$line"
    done
    local base
    base=$(median ${res[0]})
    local cl_med="" node_med=""
    echo
    echo "## Throughput: wrk -t1 -c$conns -d$DURATION, $ROUNDS rounds, order alternating; median req/s"
    printf '| %-44s | %12s | %10s | %10s | %11s | %13s | %6s | %-22s |\n' server "median req/s" "min" "max" "vs baseline" "paired ratio" errors "CPU % (main; workers)"
    echo "|----------------------------------------------|--------------|------------|------------|-------------|---------------|--------|------------------------|"
    for i in "${!names[@]}"; do
      local med
      med=$(median ${res[$i]})
      [ "$i" = 1 ] && cl_med=$med
      case "${names[$i]}" in node*) node_med=$med ;; esac
      local cpu p measured
      measured=$(awk -v n="$ROUNDS" -v d="$(secs "$DURATION")" 'BEGIN {print n * d}')
      cpu=$(awk -v t="${TICKS[${pids[$i]}]:-0}" -v s="$measured" -v hz="$CLK_TCK" 'BEGIN {printf "%.0f", 100 * t / hz / s}')
      if [ -n "${kids[$i]// /}" ]; then
        cpu="$cpu;"
        for p in ${kids[$i]}; do
          cpu="$cpu $(awk -v t="${TICKS[$p]:-0}" -v s="$measured" -v hz="$CLK_TCK" 'BEGIN {printf "%.0f", 100 * t / hz / s}')"
        done
      fi
      printf '| %-44s | %12.0f | %10.0f | %10.0f | %11s | %13s | %6s | %-22s |\n' "${names[$i]}$([ "$i" = 0 ] && echo ' (baseline)')" \
        "$med" "$(minimum ${res[$i]})" "$(maximum ${res[$i]})" "$(ratio "$med" "$base")" "$(paired "${res[$i]}" "${res[0]}")" "${errs[$i]}" "$cpu"
    done
    echo
    echo "vs baseline: ratio of the medians; paired ratio: median over rounds of (this server / baseline in the same round)."
    echo "CPU %: share of one core over the measured runs, of the main process (watcher, master, primary) and of each worker."
    echo "targets: cluster/standalone = $(ratio "$cl_med" "$base") (>= 0.95)$([ -n "$node_med" ] && echo ", cluster/node = $(ratio "$cl_med" "$node_med") (>= 1.8)")"
  done
  for i in "${skipped[@]}"; do echo "skipped: $i"; done
  for i in "${pids[@]}"; do stop "$i"; done
}

########################################################################
# 2. Reload under load (the approach of benches/reload_under_load.sh).
########################################################################
reload() {
  local port pidf="$work/reload.pid" pid
  port=$(free_port)
  start reload "$CLUSTER" --workers "$WORKERS" --log-level warn --pid-file "$pidf" "$HELLO" "127.0.0.1:$port"
  pid=$LAST_PID
  wait_http "$port" "$pid" || { log "cluster for the reload run did not start"; tail -5 "$work/reload.log" >&2; exit 1; }
  local duration=$(( RELOADS * (PAUSE + 1) + 2 ))
  run_wrk "$port" "$CONNS" 2s
  echo
  echo "## Reload under load: cluster --workers $WORKERS, wrk -t1 -c$CONNS -d${duration}s; $RELOADS x (cluster reload; sleep $PAUSE) from t=1s"
  printf '| %-30s | %10s | %10s | %13s | %7s | %7s | %17s |\n' run req/s requests socket-errors non-2xx reloads "reload time (med)"
  echo "|--------------------------------|------------|------------|---------------|---------|---------|-------------------|"
  one() { # label header reload?
    local header=$2 ok=0 failed=0 times=() t0 out="$work/wrk.reload"
    local hdr=(); [ -n "$header" ] && hdr=(-H "$header")
    wrk -t1 -c"$CONNS" -d"${duration}s" "${hdr[@]}" "http://127.0.0.1:$port/" >"$out" 2>&1 &
    wrk_pid=$!
    if [ "$3" = yes ]; then
      sleep 1
      for _ in $(seq "$RELOADS"); do
        t0=$EPOCHREALTIME
        if "$CLUSTER" reload --pid-file "$pidf" >/dev/null 2>>"$work/reload.log"; then ok=$((ok + 1)); else failed=$((failed + 1)); fi
        times+=("$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.3f", b - a}')")
        sleep "$PAUSE"
      done
    fi
    wait "$wrk_pid" || true; wrk_pid=
    local rps total errors non2xx
    rps=$(awk '/Requests\/sec/ {print $2}' "$out")
    total=$(awk '/requests in/ {print $1}' "$out")
    errors=$(awk '/Socket errors/ {gsub(",",""); print $4+$6+$8+$10}' "$out"); errors=${errors:-0}
    local detail; detail=$(awk '/Socket errors/ {gsub(",",""); printf "c%s r%s w%s t%s", $4, $6, $8, $10}' "$out")
    non2xx=$(awk '/Non-2xx/ {print $5}' "$out"); non2xx=${non2xx:-0}
    local rt="-"; [ "${#times[@]}" -gt 0 ] && rt="$(median "${times[@]}" | awk '{printf "%.0f ms", 1000 * $1}')"
    printf '| %-30s | %10s | %10s | %13s | %7s | %7s | %17s |\n' "$1" "$rps" "$total" "$errors${detail:+ ($detail)}" "$non2xx" \
      "$([ "$3" = yes ] && echo "$ok/$RELOADS" || echo -)" "$rt"
    alive "$pid" || { log "cluster exited during the reload run"; exit 1; }
  }
  log "reload under load: 4 runs of ${duration}s"
  one "keep-alive, no reload" "" no
  one "keep-alive, reloading" "" yes
  one "Connection: close, no reload" "Connection: close" no
  one "Connection: close, reloading" "Connection: close" yes
  stop "$pid"
}

########################################################################
# 3. What cluster costs.
########################################################################
cost() {
  local port pidf="$work/cost.pid" w workers=()
  echo
  echo "## Cost of cluster (from /proc/PID/stat and /proc/PID/status)"

  # Watcher at idle and under load, workers for reference.
  port=$(free_port)
  start cost "$CLUSTER" --workers "$WORKERS" --log-level warn --pid-file "$pidf" "$HELLO" "127.0.0.1:$port"
  w=$LAST_PID
  wait_http "$port" "$w" || { log "cluster did not start"; exit 1; }
  sleep 1
  workers=($(cat /proc/"$w"/task/*/children))
  local t0 t1 wt0=() wt1=() p i s
  log "watcher idle for ${IDLE}s"
  t0=$(cpu_ticks "$w"); sleep "$IDLE"; t1=$(cpu_ticks "$w")
  printf '| %-50s | %16s | %8s | %12s |\n' "process" "CPU % (CPU time)" "RSS MiB" "peak RSS MiB"
  echo "|----------------------------------------------------|------------------|----------|--------------|"
  printf '| %-50s | %16s | %8s | %12s |\n' "watcher, idle ${IDLE}s ($WORKERS workers)" "$(cpu_pct $((t1 - t0)) "$IDLE")" \
    "$(mib "$(status_kb "$w" VmRSS)")" "$(mib "$(status_kb "$w" VmHWM)")"
  s=$(secs "$DURATION")
  log "watcher under wrk -c$CONNS -d$DURATION"
  t0=$(cpu_ticks "$w"); for p in "${workers[@]}"; do wt0+=("$(cpu_ticks "$p")"); done
  run_wrk "$port" "$CONNS" "$DURATION"
  t1=$(cpu_ticks "$w"); for p in "${workers[@]}"; do wt1+=("$(cpu_ticks "$p")"); done
  printf '| %-50s | %16s | %8s | %12s |\n' "watcher, under wrk -c$CONNS -d$DURATION ($WRK_RPS req/s)" "$(cpu_pct $((t1 - t0)) "$s")" \
    "$(mib "$(status_kb "$w" VmRSS)")" "$(mib "$(status_kb "$w" VmHWM)")"
  for i in "${!workers[@]}"; do
    p=${workers[$i]}
    printf '| %-50s | %16s | %8s | %12s |\n' "  worker $((i + 1)) (pid $p), same run" "$(cpu_pct $((wt1[i] - wt0[i])) "$s")" \
      "$(mib "$(status_kb "$p" VmRSS)")" "$(mib "$(status_kb "$p" VmHWM)")"
  done
  stop "$w"

  # Per-worker RSS against the standalone example, both current-thread.
  echo
  echo "Worker memory, HELLO_THREADS=1 for both (KiB; idle = 1 s after the first answer; loaded = after wrk -c$CONNS -d3s):"
  printf '| %-36s | %8s | %8s | %9s | %10s | %10s |\n' process threads "VmRSS" "RssAnon" "VmRSS loaded" "RssAnon loaded"
  echo "|--------------------------------------|----------|----------|-----------|--------------|----------------|"
  port=$(free_port)
  start rss-cluster env HELLO_THREADS=1 "$CLUSTER" --workers "$WORKERS" --log-level warn "$HELLO" "127.0.0.1:$port"
  local cw=$LAST_PID cport=$port
  port=$(free_port)
  start rss-alone env HELLO_THREADS=1 "$HELLO" "127.0.0.1:$port"
  local aw=$LAST_PID aport=$port
  wait_http "$cport" "$cw" && wait_http "$aport" "$aw" || { log "servers for the RSS figures did not start"; exit 1; }
  sleep 1
  local idle_rows=() rows_pids=() rows_names=()
  workers=($(cat /proc/"$cw"/task/*/children))
  rows_pids=("$aw" "${workers[@]}")
  rows_names=("hello_http standalone")
  for i in "${!workers[@]}"; do rows_names+=("hello_http worker $((i + 1)) under cluster"); done
  rows_pids+=("$cw"); rows_names+=("(the watcher, for reference)")
  for p in "${rows_pids[@]}"; do idle_rows+=("$(status_kb "$p" Threads) $(status_kb "$p" VmRSS) $(status_kb "$p" RssAnon)"); done
  run_wrk "$aport" "$CONNS" 3s
  run_wrk "$cport" "$CONNS" 3s
  for i in "${!rows_pids[@]}"; do
    p=${rows_pids[$i]}
    read -r th rss anon <<<"${idle_rows[$i]}"
    printf '| %-36s | %8s | %8s | %9s | %12s | %14s |\n' "${rows_names[$i]}" "$th" "$rss" "$anon" "$(status_kb "$p" VmRSS)" "$(status_kb "$p" RssAnon)"
  done
  stop "$cw"; stop "$aw"

  # Start-up: from launching the command to every worker serving, seen as
  # WORKERS distinct x-worker-id answers (8 parallel new connections per poll,
  # so the shared accept queue cannot hide a worker for long). The same poll
  # against the standalone example (one id, `standalone`) for reference.
  log "start-up times ($STARTS runs each)"
  local ready=() first=() statust=() t
  for i in $(seq "$STARTS"); do
    port=$(free_port); pidf="$work/start$i.pid"
    t0=$EPOCHREALTIME
    start "start$i" "$CLUSTER" --workers "$WORKERS" --log-level warn --pid-file "$pidf" "$HELLO" "127.0.0.1:$port"
    w=$LAST_PID
    t=$(until_serving "$port" "$w" "$WORKERS") || { log "cluster did not serve from $WORKERS workers"; exit 1; }
    ready+=("$(awk -v a="$t0" -v b="$t" 'BEGIN {printf "%.0f", 1000 * (b - a)}')")
    t0=$EPOCHREALTIME
    "$CLUSTER" status --pid-file "$pidf" --json >/dev/null 2>&1 || true
    statust+=("$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.0f", 1000 * (b - a)}')")
    stop "$w"
    port=$(free_port)
    t0=$EPOCHREALTIME
    start "alone$i" env HELLO_THREADS="$WORKERS" "$HELLO" "127.0.0.1:$port"
    w=$LAST_PID
    t=$(until_serving "$port" "$w" 1) || { log "standalone hello_http did not answer"; exit 1; }
    first+=("$(awk -v a="$t0" -v b="$t" 'BEGIN {printf "%.0f", 1000 * (b - a)}')")
    stop "$w"
  done
  echo
  echo "Start-up ($STARTS runs; each poll is 8 parallel curl requests, a few ms):"
  echo "| from launch to | runs (ms) | median (ms) |"
  echo "|---|---|---|"
  echo "| cluster --workers $WORKERS: answers from all $WORKERS workers (distinct x-worker-id) | ${ready[*]} | $(median "${ready[@]}") |"
  echo "| hello_http standalone ($WORKERS threads): first answer | ${first[*]} | $(median "${first[@]}") |"
  echo "| (one \`cluster status --json\` round trip, once running) | ${statust[*]} | $(median "${statust[@]}") |"
}

# Poll until N distinct x-worker-id values answered on 127.0.0.1:PORT (or the
# process PID died, or 10 s); prints \$EPOCHREALTIME at that point.
until_serving() { # port pid n
  local url="http://127.0.0.1:$1/" urls=() id deadline
  local -A seen=()
  for _ in 1 2 3 4 5 6 7 8; do urls+=("$url"); done
  deadline=$(( ${EPOCHREALTIME%.*} + 10 ))
  while (( ${EPOCHREALTIME%.*} < deadline )); do
    for id in $(curl -s --parallel --parallel-immediate --parallel-max 8 -H 'Connection: close' -D - -o /dev/null "${urls[@]}" 2>/dev/null |
                tr -d '\r' | awk -F': ' 'tolower($1) == "x-worker-id" {print $2}'); do
      seen[$id]=1
    done
    if [ "${#seen[@]}" -ge "$3" ]; then echo "$EPOCHREALTIME"; return 0; fi
    alive "$2" || return 1
  done
  return 1
}

########################################################################
# 4. Instructions per request (valgrind callgrind; not part of `all`).
# Deterministic where wall-clock figures are noise: the same hello_http with
# a current-thread runtime, standalone and as the only worker of `cluster`,
# each under callgrind for PROFILE_SECS of wrk -c8 (counters zeroed after
# start-up; the graceful stop is counted); prints Ir per request and
# the functions whose self cost differs most.
########################################################################
profile() {
  command -v valgrind >/dev/null && command -v callgrind_annotate >/dev/null ||
    { echo "skipped: profile needs valgrind (apt-get install valgrind)"; return; }
  local secs=${PROFILE_SECS:-5} port w pidf="$work/profile.pid" kind
  local -A total=() reqs=()
  for kind in standalone worker; do
    port=$(free_port)
    if [ "$kind" = standalone ]; then
      start "cg-$kind" env HELLO_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$work/cg.$kind" "$HELLO" "127.0.0.1:$port"
    else
      start "cg-$kind" env HELLO_THREADS=1 "$CLUSTER" --workers 1 --log-level warn --pid-file "$pidf" -- \
        valgrind --tool=callgrind --callgrind-out-file="$work/cg.$kind" "$HELLO" "127.0.0.1:$port"
    fi
    w=$LAST_PID
    wait_http "$port" "$w" || { log "$kind under callgrind did not start"; tail -5 "$work/cg-$kind.log" >&2; exit 1; }
    # Count only the serving: zero the counters after start-up.
    local vp=$w
    [ "$kind" = worker ] && vp=$(cat /proc/"$w"/task/*/children | head -1)
    callgrind_control -z "$vp" >/dev/null 2>&1 || log "callgrind_control -z $vp failed; start-up is counted too"
    log "callgrind: $kind, wrk -c8 -d${secs}s"
    run_wrk "$port" 8 "${secs}s"
    reqs[$kind]=$WRK_TOTAL
    stop "$w"
    [ -s "$work/cg.$kind" ] || { log "no callgrind output for $kind"; exit 1; }
    total[$kind]=$(callgrind_annotate "$work/cg.$kind" 2>/dev/null | awk '/PROGRAM TOTALS/ && !t {gsub(",", "", $1); t = $1} END {print t}')
    callgrind_annotate --inclusive=no --threshold=100 "$work/cg.$kind" 2>/dev/null | awk '
      /file:function/ && !done { on = 1; getline; next }
      on && /^$/ { on = 0; done = 1 }
      on && /^ *[0-9,]+ \(/ { n = $1; gsub(",", "", n); $1 = ""; $2 = ""; sub(/^ +/, ""); sub(/ \[[^]]*\]$/, ""); sub(/^[^:]*:/, ""); a[$0] += n }
      END { for (k in a) print k "\t" a[k] }' | sort -t$'\t' -k1,1 >"$work/cg.$kind.tsv"
  done
  echo
  echo "## Instructions per request (callgrind, hello_http HELLO_THREADS=1, wrk -t1 -c8 -d${secs}s)"
  echo "| process | requests | Ir total | Ir per request |"
  echo "|---|---|---|---|"
  for kind in standalone worker; do
    echo "| hello_http $([ "$kind" = worker ] && echo "as the only worker of cluster" || echo standalone) | ${reqs[$kind]} | ${total[$kind]} | $(awk -v t="${total[$kind]}" -v n="${reqs[$kind]}" 'BEGIN {printf "%.0f", t / n}') |"
  done
  echo
  echo "Largest differences in self cost per request (worker - standalone, Ir/request):"
  join -t$'\t' -a1 -a2 -e0 -o 0,1.2,2.2 "$work/cg.standalone.tsv" "$work/cg.worker.tsv" |
    awk -F'\t' -v na="${reqs[standalone]}" -v nw="${reqs[worker]}" '{ d = $3 / nw - $2 / na; if (d > 2 || d < -2) printf "%+8.1f  %s\n", d, substr($1, 1, 110) }' |
    sort -gr | head -12
}

case "$MODE" in
  compare) compare ;;
  reload) reload ;;
  cost) cost ;;
  profile) profile ;;
  all) compare; reload; cost ;;
esac
