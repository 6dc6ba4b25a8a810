#!/usr/bin/env bash
# The three-line photo search: embed a folder once, search it any time, bring it up to date
# after adding, changing or deleting photos. Run from the repository root.
# The model is SIGLIP_MODEL: a hub id (downloaded once) or a local checkpoint folder (offline).
set -euo pipefail
export SIGLIP_MODEL=${SIGLIP_MODEL:-google/siglip-base-patch16-224}
FOLDER=${1:-examples}
INDEX=${INDEX:-/tmp/photos.npy}

siglip embed "$FOLDER" --out "$INDEX"                       # every picture -> a row of $INDEX
siglip search "$INDEX" "two cats on a sofa" --top-k 5 -f table  # the index knows its model
siglip embed "$FOLDER" --out "$INDEX" --update              # later: only new or changed photos
