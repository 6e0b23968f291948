"""What a trained model is, in memory and on disk: the UNet built from the model section, the noise schedule, the
complete-or-absent checkpoint format and the DDPMPipeline export (and checkpoints loaded as pipelines).

Below sampling, evaluation and training, which all read models; imports only the top-level modules."""
