"""Image + text models for DMM: ImageTextNet, pseudo-pair inversion, paired data sets."""
