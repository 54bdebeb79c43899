; Windows installer for the PyInstaller folder (Inno Setup 6): build dist\lora-studio first (packaging\README.md),
; then from the repository root:   iscc packaging\windows\lora-studio.iss      (CUDA build: add /DSpan)
; Identity (id, name, version, executables) comes from app_info.iss, which packaging\generate.py writes from
; studio\app_info.py; do not type them here.
#include "app_info.iss"

[Setup]
AppId={#AppId}
AppName={#AppName}
AppVersion={#AppVersion}
AppVerName={#AppName} {#AppVersion}
AppPublisher={#AppPublisher}
AppPublisherURL={#AppURL}
AppSupportURL={#AppSupportURL}
DefaultDirName={autopf}\{#AppName}
DefaultGroupName={#AppName}
DisableProgramGroupPage=yes
; Per-user by default (no administrator rights needed); the dialog still offers "for all users".
PrivilegesRequired=lowest
PrivilegesRequiredOverridesAllowed=dialog
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
OutputDir=..\..\dist
OutputBaseFilename=LoRA-Studio-{#AppVersion}-windows-x64-setup
UninstallDisplayIcon={app}\{#GuiExe}
WizardStyle=modern
; Not solid: LZMA over gigabytes of DLLs as one stream needs more memory than many build machines have.
Compression=lzma2/normal
SolidCompression=no
#ifdef Span
; A CUDA bundle is larger than the ~2 GB one setup file can hold: the data goes to setup-N.bin files beside it.
DiskSpanning=yes
#endif

[Tasks]
Name: "desktopicon"; Description: "{cm:CreateDesktopIcon}"; GroupDescription: "{cm:AdditionalIcons}"; Flags: unchecked

[InstallDelete]
; An upgrade replaces the libraries instead of merging them: a DLL left from an older torch would be loaded first.
Type: filesandordirs; Name: "{app}\_internal"

[Files]
Source: "..\..\dist\{#BundleDir}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
; Shortcuts start the windowed launcher; {#CliExe} in the same folder is the command line (no window of its own).
Name: "{autoprograms}\{#AppName}"; Filename: "{app}\{#GuiExe}"
Name: "{autodesktop}\{#AppName}"; Filename: "{app}\{#GuiExe}"; Tasks: desktopicon

[Run]
Filename: "{app}\{#GuiExe}"; Description: "{cm:LaunchProgram,{#StringChange(AppName, '&', '&&')}}"; Flags: nowait postinstall skipifsilent
