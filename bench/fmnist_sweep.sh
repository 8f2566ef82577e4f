#!/usr/bin/env bash
# Fashion-MNIST recipes for the bundled model, several at once on one GPU (issue 13).
#
# Each recipe runs the user's own commands, one after the other: `mocohub train`
# (k-NN check every 5 epochs), `mocohub lincls` (the cached 100-epoch probe of
# BENCHMARKS.md) and `scripts/bundle_model.py --half` (the weight set that would ship
# as moco_r18_fmnist_<tag>). A small ResNet-18 on 28 px images keeps a
# GPU busy only a fraction of the time from one process, so the recipes share it.
# Training is stopped at LIMIT seconds (SIGTERM: a checkpoint, no probe, no bundle).
#
#   bash bench/fmnist_sweep.sh OUT [LIMIT] [DATA]
#
# Writes OUT/sweep.tar.gz (every run's metrics.jsonl, lincls.json, log and model
# card) and OUT/<tag>.safetensors for every recipe that finished. EXTRA (flags added
# to every `mocohub train`, e.g. EXTRA="--epochs 1") makes a quick rehearsal; ONLY
# (tags, space-separated) runs those recipes alone.
set -u
OUT=${1:?usage: bench/fmnist_sweep.sh OUT [LIMIT] [DATA]}
LIMIT=${2:-280}
DATA=${3:-data/fashion-mnist}
WORK=$(mktemp -d /tmp/fmnist-sweep.XXXX)
HARDWARE=${HARDWARE:-one NVIDIA H200 GPU}
mkdir -p "$OUT"

recipe() {  # tag, then the flags of `mocohub train`
    local tag=$1 run=$WORK/$1
    shift
    if [ -n "${ONLY:-}" ]; then
        case " $ONLY " in *" $tag "*) ;; *) return 0 ;; esac
    fi
    mkdir -p "$run"
    {
        date +%s
        OMP_NUM_THREADS=2 timeout "$LIMIT" python -m mocohub train "$DATA" --out "$run" "$@" \
            --workers 0 --knn-val "$DATA" --knn-every 5 --quiet ${EXTRA:-} &&
        date +%s &&
        OMP_NUM_THREADS=2 python -m mocohub lincls "$DATA" --quiet \
            --model "$(ls "$run"/checkpoint_[0-9]*.pt | sort | tail -1)" --preset small \
            --cached-features --epochs 100 --lr 1.0 --precision fp32 --out "$run/lin" &&
        date +%s &&
        python scripts/bundle_model.py "$run" --name "moco_r18_fmnist_$tag" --half \
            --quality "$run/lin/lincls.json" --trained-on "$HARDWARE" --out "$run/bundle" \
            --command "python -m mocohub train fashion-mnist --out runs/$tag $* --knn-val fashion-mnist --knn-every 5" &&
        cp "$run/bundle/model.safetensors" "$OUT/$tag.safetensors" &&
        cp "$run/bundle/config.json" "$run/bundle/README.md" "$run/"
        echo "exit $?"
    } >"$run/log.txt" 2>&1
}

COMMON="--preset fashion_mnist --batch-size 256 --lr 0.12"
# --solarize 0.2-0.7 moved both measures in the CPU proxies (BENCHMARKS.md, "Batch size,
# learning rate and augmentation"); width 48 without it: linear 0.888, k-NN 0.852.
recipe w32_c085_sol04_e40 $COMMON --width 32 --epochs 40 --crop-min 0.85 --solarize 0.4 &
recipe w32_c085_sol02_e40 $COMMON --width 32 --epochs 40 --crop-min 0.85 --solarize 0.2 &
recipe w48_c085_sol04_e20 $COMMON --width 48 --epochs 20 --crop-min 0.85 --solarize 0.4 &
recipe w48_c085_sol04_e40 $COMMON --width 48 --epochs 40 --crop-min 0.85 --solarize 0.4 &
wait
(cd "$WORK" && tar czf "$OUT/sweep.tar.gz" --exclude='*.pt' --exclude='*.npy' --exclude='*.safetensors' .)
for log in "$WORK"/*/log.txt; do
    echo "== $log"
    tail -3 "$log"
done
