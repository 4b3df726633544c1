"""The foundation every package may use, importing nothing of the project's own:

errors     UserError, the one exception whose message reaches a user as an `error:` sentence
files      every path, local or gs://, through etils.epath; outputs appear whole or not at all
sharding   the device mesh, logical axis rules and global batches
images     model images to uint8, grids, and the one place that writes PNG and .npz pictures
progress   the progress lines of phases that take more than a moment
quiet_import  TensorFlow loaded without the notices its C++ core prints as it loads
workdir_layout  the name of every file and folder a workdir holds (and the tokenizer files'
           names, shared with converted and HF directories)
"""
