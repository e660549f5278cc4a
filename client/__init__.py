"""The client machine: a model of its kernel memory manager, network and swap device."""
