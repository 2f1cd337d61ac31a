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

# ruff + mypy.
lint:
    {{venv}}/bin/ruff check phash_trio tests bench
    {{venv}}/bin/ruff format --check phash_trio tests bench
    {{venv}}/bin/mypy phash_trio

# Benchmarks: hashing, rule lookup, end-to-end pipeline, the HTTP API (at 1 M PDQ hashes). Prints figures.
bench:
    {{py}} bench/bench_hash.py
    {{py}} bench/bench_match.py
    {{py}} bench/bench_pipeline.py
    {{py}} bench/bench_events.py
    {{py}} bench/bench_api.py
