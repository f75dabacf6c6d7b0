"""TorchServe handler for the digits TorchScript artifact: the same JSON as kiln's /predict batch form."""

import json

import torch
from ts.torch_handler.base_handler import BaseHandler


class DigitsHandler(BaseHandler):
    def preprocess(self, data):
        images = []
        for row in data:
            body = row.get("body") or row.get("data")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            images.append(torch.tensor(body["inputs"]["image"], dtype=torch.float32))
        self._counts = [len(x) for x in images]
        return torch.cat(images)

    def inference(self, data, *args, **kwargs):
        with torch.inference_mode():
            return self.model(data)

    def postprocess(self, logits):
        probs = torch.softmax(logits, dim=1)
        out, start = [], 0
        for count in self._counts:
            chunk = probs[start:start + count]
            start += count
            out.append({"predictions": [{"class": int(p.argmax()), "probabilities": p.tolist()} for p in chunk]})
        return out
