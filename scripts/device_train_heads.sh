#!/usr/bin/env bash
# Continue training a heads generator (heads-64, or heads-portrait-64 with FRAMING=portrait) on a lent GPU machine for a fixed time, and bring back what
# the next session resumes from. Run from the repository root on the device machine, as one `run` call:
#
#   scripts/device_wheels.sh                        # here, once: wheels the GPU image lacks -> runs/device-wheels
#   run(command="bash scripts/device_train_heads.sh 480", carry=["runs/device-wheels"], timeout_s=590)
#
# then, here: copy $OUT/state/* to training/NAME/state/, $OUT/log.jsonl and $OUT/training.json to
# training/NAME/, the snapshot folder to runs/NAME/ and evaluate it with scripts/ship_heads_generator.py
# (--framing portrait for heads-portrait-64).
#
# Arguments: SECONDS, the whole script's budget (default 480). Environment: FRAMING (bust: resume
# training/heads-64; portrait: resume training/heads-portrait-64, on portrait heads), HEADS_N (training heads, default
# 50000: the set the shipped generator was trained on), DEVICE (cuda), PRECISION (fp32: the mixed-precision CUDA
# path has not run on a GPU yet), SNAPSHOT (images between snapshots, default 50000), RUN (runs/device-NAME),
# WIDTHS ("CHANNEL_BASE CHANNEL_MAX", e.g. "8192 256": train a wider generator from scratch in RUN instead of
# resuming the shipped one; a later call with the same RUN and WIDTHS resumes it). The shipped generator's FPD
# stayed at 15x its floor from 400k to 480k images seen, on 50,000 and then 200,000 training heads alike: its
# width, not its data, is what limits it.
set -euo pipefail
budget=${1:-480}
start=$SECONDS
n=${HEADS_N:-50000}
framing=${FRAMING:-bust}
case $framing in
  bust) name=heads-64 ;;
  portrait) name=heads-portrait-64 ;;
  *) echo "FRAMING must be bust or portrait, not $framing" >&2; exit 2 ;;
esac
run=${RUN:-runs/device-$name}
out=${OUT:?set OUT to the folder whose files come back}
py=${PYTHON:-python3}

if [ -d runs/device-wheels ]; then  # the GPU image has torch, numpy, pillow, safetensors, tqdm, pyyaml
  $py -m pip install -q --no-index --find-links runs/device-wheels pydantic pycocotools
fi
$py -m pip install -q --no-deps --no-build-isolation -e .

# The training heads: image i of seed 4 depends only on (4, i), so parts rendered in parallel and gathered into
# one folder are exactly the set (and file order) the generator was trained on.
data=runs/$framing-gan-$n-images
if [ ! -d "$data" ]; then
  parts=$(nproc)
  per=$(( (n + parts - 1) / parts ))
  for i in $(seq 0 $((parts - 1))); do
    first=$((i * per)); count=$(( first + per > n ? n - first : per ))
    [ "$count" -gt 0 ] || continue
    $py -m handsoff render-heads --out "runs/$framing-parts/$i" --n "$count" --start "$first" --seed 4 --size 64 \
      --framing "$framing" --batch 64 > "runs/render-$i.log" 2>&1 &
  done
  wait
  mkdir -p "$data.partial"
  for d in runs/$framing-parts/*/images; do mv "$d"/*.png "$data.partial"/; done
  mv "$data.partial" "$data"
fi
echo "rendered $(ls "$data" | wc -l) heads in $((SECONDS - start)) s"

widths=()
if [ -n "${WIDTHS:-}" ]; then
  read -r base max <<< "$WIDTHS"
  widths=(--channel-base "$base" --channel-max "$max")
elif [ ! -d "$run" ]; then
  mkdir -p "$run"
  cp -r "training/$name/." "$run"/
  rm -f "$run/README.md" "$run"/samples-*.png
fi
rate=()
if [ -f "$run/training.json" ]; then  # resuming: the run's own rate (a new run takes train-gan's default)
  rate=(--lr "$($py -c "import json, sys; print(json.load(open(sys.argv[1]))['lr'])" "$run/training.json")")
fi
left=$(( budget - (SECONDS - start) - 40 ))  # leave time to copy the state back
echo "training for $left s"
timeout --signal=INT "$left" $py -m handsoff train-gan --data "$data" --out "$run" --size 64 --images 5000000 \
  --snapshot "${SNAPSHOT:-50000}" --tick 10000 --seed 0 --precision "${PRECISION:-fp32}" "${rate[@]}" \
  "${widths[@]}" --device "${DEVICE:-cuda}" 2>&1 | tr '\r' '\n' | grep -v '^train-gan: ' | tail -n 25 || true

mkdir -p "$out/state"
cp "$run"/state/* "$out/state/"
cp "$run/training.json" "$out/"
if [ -f "$run/log.jsonl" ]; then cp "$run/log.jsonl" "$out/"; fi  # a run shorter than one tick has none yet
last=$(ls -d "$run"/network-* | sort | tail -n 1)
mkdir -p "$out/$(basename "$last")"
cp "$last"/* "$out/$(basename "$last")/"
tail -n 3 "$run/log.jsonl"
seen=$($py -c "import json, sys; print(json.load(open(sys.argv[1]))['state']['images_seen']['value'])" \
  "$out/state/state.json")
echo "state at $seen images; done in $((SECONDS - start)) s"
