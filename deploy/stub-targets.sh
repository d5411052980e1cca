#!/bin/sh
# Writes a stub `fn main() {}` for every target Cargo.toml names ([[bin]], [[test]], [[bench]],
# [[example]]: their files must exist for cargo to read the manifest) and an empty src/lib.rs,
# so that the Dockerfile's first stage can compile the dependencies before the sources are
# copied in. Run in a directory holding only Cargo.toml and Cargo.lock. tests/deploy.rs runs it
# too and checks that cargo accepts the result.
set -eu
mkdir -p src
: >src/lib.rs
awk '
    function flush() {
        if (kind != "") {
            if (path == "") path = dir[kind] "/" name ".rs"
            print path
        }
        kind = ""; name = ""; path = ""
    }
    BEGIN { dir["bin"] = "src/bin"; dir["test"] = "tests"; dir["bench"] = "benches"; dir["example"] = "examples" }
    /^\[/ {
        flush()
        if ($0 ~ /^\[\[(bin|test|bench|example)\]\]/) { kind = $0; gsub(/[][ \t]/, "", kind) }
        next
    }
    kind != "" && /^name[ \t]*=/ { v = $0; sub(/^name[ \t]*=[ \t]*"/, "", v); sub(/".*/, "", v); name = v }
    kind != "" && /^path[ \t]*=/ { v = $0; sub(/^path[ \t]*=[ \t]*"/, "", v); sub(/".*/, "", v); path = v }
    END { flush() }
' Cargo.toml | while read -r target; do
    mkdir -p "$(dirname "$target")"
    echo 'fn main() {}' >"$target"
done
