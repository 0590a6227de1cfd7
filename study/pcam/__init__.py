"""The PCam paper ("The influence of batch size on CNN performance ... for histopathology image
categorisation"): its command (`python -m study.pcam`, command), trial (trainable), workload and its options, the
stored layout of its trial configs (stored), data reader, VGG16 model, augmentation and report section. Importing
the package imports nothing."""

WORKLOAD = "pcam"  # the name of its workload (this package's `workload` module) in study.workload
