"""The Python API the CLI is built on. Run: python examples/python_api.py [MODEL] (default: SIGLIP_MODEL)"""

import sys

import numpy as np

import siglip_cli

model = siglip_cli.load(sys.argv[1] if len(sys.argv) > 1 else None)  # None: SIGLIP_MODEL, else base-224

labels = ["2 cats", "2 dogs", "a remote control"]
probs = model.classify(["examples/cats.png"], labels)  # (1, 3) sigmoid probabilities
for label, p in zip(labels, probs[0]):
    print(f"{p:7.2%}  {label}")

images = model.embed_images(["examples/cats.png"])  # (1, D), L2-normalised
texts = model.embed_texts(labels, template="This is a photo of {}.")  # (3, D), L2-normalised
print("cosine:", np.round(images @ texts.T, 3))
print("logits:", np.round(model.logits(images, texts), 3))  # exp(t) * cosine + b
