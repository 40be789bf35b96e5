"""Library-owned compute. Kernels know nothing about methods: they take tensors, positions and masks."""
