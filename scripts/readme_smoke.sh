#!/usr/bin/env bash
# Runs every command of the README's "Everyday commands" and method sections on the embedded data (small steps),
# so the README stays true. Usage: bash scripts/readme_smoke.sh [WORKDIR]
set -euxo pipefail
W=${1:-$(mktemp -d)}
cd "$W"
vfmkit data info builtin:flickr8k/train
torchrun --standalone --nproc_per_node 2 -m vfmkit.cli train clip_tiny --set train.steps=20 --out runs/clip_ddp
vfmkit train clip_tiny --set train.steps=20 --out runs/clip
vfmkit eval --model vfm-tiny-vit --pretrained runs/clip --out runs/clip/eval
vfmkit reinforce clip builtin:flickr8k/heldout --out runs/rdata --teacher offline --n-aug 2 --n-syn 0 --images
vfmkit train mobileclip_tiny --set method_args.reinforced=runs/rdata --set train.steps=20 --out runs/mclip
vfmkit reinforce classify builtin:imagenette/train --out runs/dr_data --class-index imagenette --size 128 --n-aug 2
vfmkit train dr_imagenette --set method_args.reinforced=runs/dr_data --set data.train=builtin:imagenette/train \
    --set data.val=builtin:imagenette/val --set method_args.epochs=1 --out runs/dr
vfmkit catlip vocab --data builtin:flickr8k/train --out runs/catlip/vocab.json --min-count 3
vfmkit catlip transfer --vocab runs/catlip/vocab.json --classes builtin:imagenette
vfmkit subclone train --recipe subclone_vit_parent --set train.steps=20 --out runs/vit_parent
vfmkit subclone run runs/vit_parent --layers 3 --width 96 --out runs/vit_child
vfmkit backfill --out runs/backfill
vfmkit eval --tasks seg --tower efficientnet-lite0 --seg-steps 20 --out runs/seg_eval
vfmkit train camvid_teacher --set data.train=builtin:camvid/train --set data.val=builtin:camvid/val \
    --set train.steps=20 --out runs/camvid_teacher_smoke
vfmkit tic prepare --out runs/tic_emoji/stream
vfmkit tic run --strategy sequential,cumulative-all --set train.steps=10 --set data.batch_size=16 --out runs/tic_emoji
vfmkit tic report runs/tic_emoji
vfmkit export runs/clip --out runs/clip/export --quantize int8 --parity
vfmkit reinforce dense builtin:flickr8k/heldout --out runs/pl --expert person
vfmkit train cliptex_tiny --set data.train=runs/pl --set train.steps=20 --out runs/cliptex
echo "README commands OK in $W"
