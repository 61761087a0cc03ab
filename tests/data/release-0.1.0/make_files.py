"""Write small adapter files with an earlier release (run from its checkout, e.g. `git worktree add ../old 116c405`;
then `python tests/data/release-0.1.0/make_files.py OUT` from there): the compatibility fixtures of test_file_compat."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, "tests")
from conftest import tiny_pipeline  # noqa: E402

from superlora_diffusers import SuperLoRAConfig  # noqa: E402
from superlora_diffusers.model import inject_superlora  # noqa: E402
from superlora_diffusers.tokens import token_ids_for  # noqa: E402

out = Path(sys.argv[1])
cases = {
    "lorta-unet-text": SuperLoRAConfig.lorta(fold=3, groups=2, rank=3, target_modules="unet+text"),
    "tucker-axes-conv-token": SuperLoRAConfig(factorization="tucker", groups="shape", fold=3, rank=1,
                                              target_modules="unet+conv+text"),
}
for name, config in cases.items():
    pipe = tiny_pipeline()
    if "token" in name:
        import dataclasses
        config = dataclasses.replace(config, token="sks", token_ids=tuple(token_ids_for(pipe.tokenizer, "sks")),
                                     token_dim=pipe.text_encoder.get_input_embeddings().embedding_dim)
    module = inject_superlora(pipe._superlora_components(), config)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    pipe.save_superlora_weights(out / name)
    with torch.no_grad():
        pairs = list(zip(pipe.unet._superlora.adapters["default"].targets, module()))
        deltas = {t: d.contiguous() for t, d in (pairs[0], pairs[len(pairs) // 2], pairs[-1])}
    expected = {f"delta.{k}": v for k, v in deltas.items()}
    if config.token is not None:
        expected["token.delta"] = module.tokens.delta.detach().clone()
    save_file(expected, str(out / name / "expected.safetensors"))
    print(name, sum(p.numel() for p in module.parameters()), sorted(p.name for p in (out / name).iterdir()))
