#!/usr/bin/env bash
# The lent GPU machine returns at most 8 files from $OUT (device README, Limits): end a call that writes more with
# `bash bench/pack_out.sh "$OUT"`, which leaves one archive of everything under it, out.tar.gz (unpack it here with
# `tar xzf out.tar.gz`), and a copy of each steps.log beside it, to read without unpacking.
set -euo pipefail
out="${1:?usage: bash bench/pack_out.sh DIR}"
archive=$(mktemp --suffix .tar.gz)
tar czf "$archive" -C "$out" .
logs=$(mktemp -d)
find "$out" -name steps.log | while read -r log; do
  rel=$(dirname "${log#"$out"/}")  # . for $OUT's own
  [ "$rel" = . ] && name=steps.log || name="steps-${rel//\//-}.log"
  cp "$log" "$logs/$name"
done
find "$out" -mindepth 1 -delete
mv "$archive" "$out/out.tar.gz"
find "$logs" -type f | head -7 | xargs -r -I{} mv {} "$out/"
rm -rf "$logs"
ls -la "$out"
