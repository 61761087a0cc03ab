#!/usr/bin/env bash
# Set up (idempotent), then the main job on the embedded default base model, offline:
# DreamBooth one shared SuperLoRA (the `tucker-axes-shared` preset over the UNet's attention and ResNet convs and
# CLIP's attention, with the identifier's embedding: 12,377 parameters) on the bundled images of one subject
# and generate with it (validation grids and a last validation from the reloaded weights, all under $OUT).
# The judge's scores are a separate command (below).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-out/demo}
.venv/bin/python train_dreambooth_superlora.py \
  --pretrained_model_name_or_path toy \
  --instance_data_dir examples/striped_star --instance_prompt "a photo of sks star" \
  --with_prior_preservation --class_prompt "a photo of a star" --class_data_dir "$OUT/class_images" \
  --num_class_images 24 --prior_loss_target base_model \
  --superlora_preset tucker-axes-shared --target_modules unet+conv --train_text_encoder \
  --train_text_encoder_ti --text_encoder_lr 5e-3 \
  --max_train_steps "${STEPS:-1500}" --learning_rate 3e-3 --train_batch_size 4 --random_flip \
  --validation_prompt "a photo of sks star" --validation_steps 500 --num_validation_images 4 \
  --checkpointing_steps 500 --report_to tensorboard \
  --output_dir "$OUT" --overwrite_output_dir
echo "Adapter, model card and sample images: $OUT/. Judge base vs adapter (about 2 minutes):"
echo "  .venv/bin/python -m superlora_diffusers.evaluate $OUT --subject striped_star --n 32"
