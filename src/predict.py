"""Run a checkpoint on image files: ``python src/predict.py ckpt_path=.../best.ckpt inputs=DIR_OR_IMAGES``.

Model, classes and preprocessing are rebuilt from the checkpoint alone (the dataset need not
exist); writes a figure per image and predictions.json to ``out``. The body is
``vitlab.tools.predict.predict``; ``vitlab-predict`` is the same command for an installed vitlab.
"""
from vitlab.tools.predict import main

if __name__ == "__main__":
    main()
