"""The export half of `T5Trainer`: a plain Hugging Face checkpoint written by every process from
the weights it holds (with LoRA, the merged weights and the adapter alone), checked by reloading
it, and Graphcore's `save_hf_checkpoint`, which returns the fine-tuned model."""
from pathlib import Path
from typing import Dict, Union

import torch

from .. import lora
from ..backends.host_memory import return_freed_memory
from ..checkpointing.adapter import write_adapter
from ..checkpointing.export import write_hf_checkpoint
from ..errors import UserError


class HfExport:
    """Mixed into `T5Trainer`: uses its config, backend, tokenizer, model description and last
    validation."""

    def _refuse_if_released(self) -> None:
        if self._released:
            raise UserError("this trainer released its model after its last export (export_hf(release_model=True)): "
                            "load the export, or build a new T5Trainer with --resume.")

    def export_hf(self, hf_path: Union[str, Path, None] = None, ckpt_path: Union[str, Path, None] = None,
                  adapter_path: Union[str, Path, None] = None, release_model: bool = False) -> Path:
        """Export a plain Hugging Face checkpoint to `hf_path` (default `<output-dir>/hf`), checked
        by reloading it with transformers, and, when given, a training checkpoint to `ckpt_path`.
        With LoRA the export holds the merged weights, and the adapter alone goes to `adapter_path`
        (default `<output-dir>/adapter`). Returns the export's path, also kept as `hf_path`.

        `release_model` (the run's last export, as `ipu-t5 train` ends): every process frees its
        model once its weights are written, before the main process reloads the export to check it,
        so that check holds one model rather than one on top of a stage; the trainer then refuses to
        train, validate or export again."""
        self._refuse_if_released()
        if release_model and ckpt_path:
            raise UserError("export_hf cannot write a training checkpoint after releasing the model: save it "
                            "first (save_checkpoint) or leave release_model off.")
        self._claim()
        self._refuse_nonfinite_weights()
        hf_path = Path(hf_path) if hf_path else self.output_dir / "hf"
        # Each process writes the weights it holds; none gathers the model.
        share = self.backend.export_share()
        results = self.last_eval
        if lora.enabled(self.config):
            adapters: Dict[str, torch.Tensor] = {}
            for part in self.backend.gather_object({k: v.detach().cpu() for k, v in lora.adapter_state(share).items()}):
                adapters.update(part)
            # A soft prompt does not merge: the export is the base it goes with, and the adapter names it.
            soft_prompt = not lora.is_lora(self.config)
            base = str(hf_path.resolve()) if soft_prompt else self.base_model
            results = None if soft_prompt else results
            self.backend.on_main(lambda: write_adapter(
                Path(adapter_path) if adapter_path else self.output_dir / "adapter", adapters, self.config.peft,
                base, self.tokenizer, self.hf_config))
            share = lora.merged_state(share, self.config.peft)
        example = self.eval_features[0]["prompt"] if self.eval_features is not None else None

        def release() -> None:
            nonlocal share
            share = None
            self.backend.release_model()
            self._released = True
            return_freed_memory()

        exported = write_hf_checkpoint(hf_path, share, self.hf_config, self.tokenizer, self.config.to_dict(),
                                       results, self.eval_config.max_new_tokens or self.lengths.target,
                                       example_prompt=example, prompt_length=self.prompt_length, group=self.backend,
                                       release=release if release_model else None)
        self._say(exported.describe())
        if ckpt_path:
            self.save_checkpoint(ckpt_path)
        self.hf_path = hf_path
        return hf_path

    def save_hf_checkpoint(self, hf_path: Union[str, Path, None] = None,
                           ckpt_path: Union[str, Path, None] = None,
                           adapter_path: Union[str, Path, None] = None):
        """Graphcore's call: `export_hf` (the same arguments), then the fine-tuned model loaded
        from the export by plain transformers: a `T5ForConditionalGeneration` on the CPU, as
        `finetuned = trainer.save_hf_checkpoint(hf_path, ckpt_path)` expects. The export's path
        is `trainer.hf_path`. In a multi-process run only the main process loads the model (a
        model split for size may not fit on each rank); the others return None."""
        path = self.export_hf(hf_path, ckpt_path, adapter_path)
        if not self.is_main_process:
            return None
        from transformers import T5ForConditionalGeneration

        return T5ForConditionalGeneration.from_pretrained(str(path)).eval()
