"""dmm on Flower: the example app (`flwr run .`)."""
