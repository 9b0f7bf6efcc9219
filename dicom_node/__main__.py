from dicom_node.app.cli import main
import sys
sys.exit(main())
