"""Training, enhancement and evaluation of the IR-SDE low-light model (`python -m train ...`)."""
