from dicom_node.cli import main

main()
