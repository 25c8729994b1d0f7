# Sourced by the GPU scripts (gpu_check.sh, gpu_input.sh): the output folder, this package and
# any wheels carried in .whl/ on the path, and step() to run one timed, logged check.
# The caller sets $out first.
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/bench_site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/bench_site"
fi

step() {  # name, time limit (s), command...
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
}
