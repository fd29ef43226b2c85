"""encmm training core: configs, data, students/teachers, KD losses, the loop, the Ray Train worker."""
