#!/usr/bin/env bash
# Zero-shot classification from the shell. Run from the repository root.
# SIGLIP_MODEL can be a hub id (downloaded once) or a local checkpoint folder (works offline).
set -euo pipefail
export SIGLIP_MODEL=${SIGLIP_MODEL:-google/siglip-base-patch16-224}

# One image, a table on the terminal:
siglip classify examples/cats.png --labels "2 cats,2 dogs,a remote control"

# Piped: JSON lines; keep the best label of each image with jq.
siglip classify examples/*.png --labels "2 cats,2 dogs" \
  | jq -r '[.path, .labels[0].label, .labels[0].score] | @tsv'

# A prompt ensemble and a single-label (softmax) view:
siglip classify examples/cats.png --labels "cat,dog,bird" --softmax \
  -t "a photo of a {}." -t "a blurry photo of a {}." -t "a drawing of a {}." --json
