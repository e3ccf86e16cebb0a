"""The model and how it learns: backbone and head, augmentation, input pipelines, the two-phase fit, class weights."""
