"""The paper's published numbers, transcribed from ../shared/paper/activeft-cvpr2023.md (Xie et al., CVPR 2023).

tests/test_paper_numbers.py checks this transcription against the paper file when it is present.
"""

# Table 1: top-1 accuracy (%) mean±std over three trials; None = "-" in the paper.
TABLE1_COLUMNS = [("CIFAR10", "0.5%"), ("CIFAR10", "1%"), ("CIFAR10", "2%"), ("CIFAR100", "1%"), ("CIFAR100", "2%"),
                  ("CIFAR100", "5%"), ("CIFAR100", "10%"), ("ImageNet", "1%"), ("ImageNet", "5%")]
TABLE1 = {
    "Random": ["77.3±2.6", "82.2±1.9", "88.9±0.4", "14.9±1.9", "24.3±2.0", "50.8±3.4", "69.3±0.7", "45.1±0.8", "64.3±0.3"],
    "FDS": ["64.5±1.5", "73.2±1.2", "81.4±0.7", "8.1±0.6", "12.8±0.3", "16.9±1.4", "52.3±1.9", "26.7±0.6", "55.5±0.1"],
    "K-Means": ["83.0±3.5", "85.9±0.8", "89.6±0.6", "17.6±1.1", "31.9±0.1", "42.4±1.0", "70.7±0.3", None, None],
    "CoreSet": [None, "81.6±0.3", "88.4±0.2", None, "30.6±0.4", "48.3±0.5", "62.9±0.6", None, "61.7±0.2"],
    "VAAL": [None, "80.9±0.5", "88.8±0.3", None, "24.6±1.1", "46.4±0.8", "70.1±0.4", None, "64.0±0.3"],
    "LearnLoss": [None, "81.6±0.6", "86.7±0.4", None, "19.2±2.2", "38.2±2.8", "65.7±1.1", None, "63.2±0.4"],
    "TA-VAAL": [None, "82.6±0.4", "88.7±0.2", None, "34.7±0.7", "46.4±1.1", "66.8±0.5", None, "64.3±0.2"],
    "ALFA-Mix": [None, "83.4±0.3", "89.6±0.2", None, "35.3±0.8", "50.4±0.9", "69.9±0.6", None, "64.5±0.2"],
    "ActiveFT (ours)": ["85.0±0.4", "88.2±0.4", "90.1±0.2", "26.1±2.6", "40.7±0.9", "54.6±2.3", "71.0±0.5", "50.1±0.3",
                        "65.3±0.1"],
}

# Registry name -> the paper's row name.
METHOD_LABELS = {"random": "Random", "fds": "FDS", "kmeans": "K-Means", "coreset": "CoreSet", "vaal": "VAAL",
                 "learnloss": "LearnLoss", "tavaal": "TA-VAAL", "alfamix": "ALFA-Mix", "activeft": "ActiveFT",
                 "typiclust": "TypiClust", "probcover": "ProbCover", "bilaf": "BiLAF"}

# Table 3: selection time on the CIFAR100 training set (rows: ratio).
TABLE3_COLUMNS = ["K-Means", "CoreSet", "VAAL", "LearnLoss", "ActiveFT (ours)"]
TABLE3 = {"2%": ["16.6s", "1h57m", "7h52m", "20m", "12.6s"],
          "5%": ["37.0s", "7h44m", "12h13m", "1h37m", "21.9s"],
          "10%": ["70.2s", "20h38m", "36h24m", "9h09m", "37.3s"]}

# Table 5: ablations on CIFAR100, DeiT-S (a: c_i update manner, b: regularization design).
TABLE5_COLUMNS = ["No-Update", "Update", "S1 (no regularization)", "S2 (InfoNCE)", "ours"]
TABLE5 = {"2%": ["20.6", "40.7", "33.1", "26.8", "40.7"],
          "5%": ["52.8", "54.6", "51.5", "46.9", "54.6"]}

# Table 6: temperature, CIFAR10, DeiT-S.
TABLE6_COLUMNS = ["tau = 0.04", "tau = 0.07", "tau = 0.2", "tau = 0.5"]
TABLE6 = {"0.5%": ["85.6", "85.0", "84.1", "83.5"],
          "1%": ["87.4", "88.2", "85.3", "86.1"],
          "2%": ["90.3", "90.1", "89.6", "89.0"]}

# Table 7 (appendix A): iteration number T, ImageNet 1%, DINO DeiT-S; T = 0 is random selection.
TABLE7_COLUMNS = ["0", "50", "75", "100", "200", "300"]
TABLE7 = {"1%": ["45.1", "46.7", "48.4", "50.2", "50.1", "50.1"]}

# Table 2: semantic segmentation mIoU on ADE20k (rows: ratio); only ActiveFT has a std in the paper.
TABLE2_COLUMNS = ["Random", "FDS", "K-Means", "ActiveFT (ours)"]
TABLE2 = {"5%": ["14.54", "6.74", "13.62", "15.37±0.11"],
          "10%": ["20.27", "12.65", "19.12", "21.60±0.40"]}
