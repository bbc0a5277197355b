"""Image + text models for DMM: ImageTextNet, pseudo-pair inversion, paired data sets.

Importing registers the `image_text` architecture (dmm.models) and the `emoji-mm` and
`crisismmd` data sets (dmm.data); `import dmm` does it.
"""

from dmm.multimodal import data, model  # noqa: F401
