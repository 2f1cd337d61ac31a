# phash_trio commands. `./dev RECIPE` installs what is needed, then runs `just RECIPE`.

venv := ".venv"
py := venv / "bin/python"

# List the recipes.
default:
    @just --list

# (Re)install the virtualenv, the project and redis-server if missing (./dev does this for you).
setup:
    rm -f {{venv}}/.installed-*
    ./dev --list >/dev/null

# Run the service against the live network with your .env (see .env.example).
run:
    {{venv}}/bin/phash-trio rules check "${RULES_FILE:-rules/blobs.json}" >/dev/null
    exec {{venv}}/bin/phash-trio run

# The whole pipeline end to end on this machine: local Jetstream replay, CDN/PDS, PLC, fake Ozone, Redis.
demo:
    {{py}} -m phash_trio.testing.demo

# Run the test suite.
test:
    {{py}} -m pytest -q

# The service against a real local AT Protocol network (npm @atproto/dev-env: PLC, PDS, AppView, Ozone on Postgres). Needs apt postgresql + npm and the npm registry; the install is cached.
e2e-ozone:
    PHASH_E2E_NODE_DIR="$(e2e_ozone/prepare)" {{py}} -m pytest -q -p no:cacheprovider e2e_ozone

# ruff + mypy.
lint:
    {{venv}}/bin/ruff check phash_trio tests bench e2e_ozone
    {{venv}}/bin/ruff format --check phash_trio tests bench e2e_ozone
    {{venv}}/bin/mypy phash_trio

# Benchmarks: hashing, rule lookup, end-to-end pipeline, banks (PDQ/mean-hash index at 1 M), events, the HTTP API (at 1 M PDQ hashes). Prints figures.
bench:
    {{py}} bench/bench_hash.py
    {{py}} bench/bench_match.py
    {{py}} bench/bench_pipeline.py
    {{py}} bench/bench_banks.py
    {{py}} bench/bench_events.py
    {{py}} bench/bench_api.py

# Fuzz mean_hash: mutated real JPEG/PNG/GIF/WebP in limited child processes; findings -> fuzz-findings/.
fuzz cases="20000" seed="1" target="mean_hash":
    {{py}} -m phash_trio.testing.fuzz --cases {{cases}} --seed {{seed}} --target {{target}}

# Cost of each hostile-input class (CPU, peak RSS) at the default limits.
hostile:
    {{py}} -m phash_trio.testing.hostile
