"""CRAFT character-region text detector (seed 004): VGG16-BN U-Net, Gaussian heat maps, ICDAR-2015 data."""
