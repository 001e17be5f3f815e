"""`python -m kdtrain ...` (and `accelerate launch -m kdtrain run ...`)."""

from kdtrain.cli import main

main()
