"""Run inside axolotl's own venv: axolotl 0.19.0's KD loader, collator and loss on an export.

Usage: check_export.py MODEL_DIR EXPORT_DIR RESULT_JSON. For each dataset entry of the export's
axolotl_datasets.yaml it tokenises every row with axolotl's KD chat-template strategy, batches
them with axolotl's KD collator and, with the student = the teacher's own weights (float32),
measures at every position axolotl marks as a target the gap between the student's log-softmax
gathered at axolotl's target_token_ids (renormalised over them) and axolotl's target_logprobs;
then runs axolotl's top-K forward-KL loss on the batch. Writes the numbers as JSON.
"""

import json
import sys

import torch
import yaml
from axolotl.integrations.kd.chat_template import load
from axolotl.integrations.kd.collator import DataCollatorForKD
from axolotl.integrations.kd.topk_logprob.forward_kl import loss as kd_loss
from axolotl.utils.dict import DictDefault
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(model_dir: str, export_dir: str, result_path: str) -> None:
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with open(f"{export_dir}/axolotl_datasets.yaml") as fh:
        datasets = yaml.safe_load(fh)["datasets"]
    results = {}
    for ds_cfg in datasets:
        cfg = DictDefault({"sequence_len": 1024, "train_on_inputs": False, "kd_temperature": 1.0})
        strategy = load(tokenizer, cfg, DictDefault(ds_cfg))
        with open(ds_cfg["path"]) as fh:
            rows = [json.loads(line) for line in fh]
        features = [strategy.tokenize_prompt(dict(row)) for row in rows]
        keep = ("input_ids", "attention_mask", "labels", "target_logprobs", "target_token_ids")
        features = [{k: f[k] for k in (*keep, "target_mask")} for f in features]
        batch = DataCollatorForKD(tokenizer=tokenizer, return_tensors="pt")(features)
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.float()
        lsm = torch.log_softmax(logits, -1)
        ids = batch["target_token_ids"].long()
        got = torch.gather(lsm, -1, ids)
        got = got - torch.logsumexp(got, -1, keepdim=True)  # renormalised over the K ids
        mask = batch["target_mask"].bool()
        gap = (got - batch["target_logprobs"].float()).abs()[mask]
        value = kd_loss(logits, ids, batch["target_logprobs"], batch["target_mask"])
        results[ds_cfg["path"].rsplit("/", 1)[-1]] = {
            "rows": len(rows),
            "batch_shape": list(batch["input_ids"].shape),
            "target_positions": int(mask[..., 0].sum()),
            "max_gap": float(gap.max()) if gap.numel() else None,
            "kd_loss": float(value),
        }
    with open(result_path, "w") as fh:
        json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:4])
