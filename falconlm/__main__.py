from falconlm.cli import console_main

console_main()
