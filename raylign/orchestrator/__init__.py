"""The driver side: starts or attaches to Ray, wires actors into eval and training loops."""
