from moba_train.cli import main

main()
